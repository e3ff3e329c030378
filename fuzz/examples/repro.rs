//! Replays one `datagram` input outside libFuzzer: prints the operations it decodes to, then
//! runs them with the harness's checks, so a failing assertion shows its message and backtrace.
//!
//! ```sh
//! cd fuzz && cargo run --release --example repro -- artifacts/datagram/crash-...
//! ```

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: repro <datagram input file>");
        std::process::exit(2);
    };
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    for op in veil_fuzz::datagram::decode(&data) {
        eprintln!("{op:?}");
    }
    println!("{:?}", veil_fuzz::datagram::run(&data));
}
