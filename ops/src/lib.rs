//! What every Veil binary shares for operations: logging set-up, the ops HTTP endpoint
//! (`/metrics`, `/healthz`, `/readyz`), shutdown signals, redaction of client addresses in logs,
//! process statistics, and dialling every address of a service name. It holds no Veil logic.

pub mod build;
pub mod check;
pub mod dial;
pub mod http;
pub mod keys;
pub mod logging;
pub mod process;
pub mod redact;
pub mod signal;

/// Exit status for bad configuration (`EX_USAGE` from sysexits.h): the binary stops before
/// binding anything.
pub const EXIT_CONFIG: i32 = 64;

/// Parses command-line flags (with their environment fallbacks), exiting 64 with clap's message,
/// which names the offending flag, if they are invalid; `--help` and `--version` exit 0.
pub fn parse_flags<C: clap::Parser>() -> C {
    match C::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => EXIT_CONFIG,
            };
            // Printing can only fail if stderr is gone; the exit status still tells.
            let _ = e.print();
            std::process::exit(code);
        }
    }
}

/// Reports a configuration error that clap could not catch (a file that does not parse, say)
/// and exits 64.
pub fn config_error(err: &anyhow::Error) -> ! {
    eprintln!("error: invalid configuration: {err:#}");
    std::process::exit(EXIT_CONFIG);
}
