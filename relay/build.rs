//! With the `xdp` feature, builds the kernel fast path (xdp/veil.bpf.c) with clang into
//! OUT_DIR, where relay/src/xdp.rs embeds it. No object is checked in: what loads is what the
//! source says.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=xdp/veil.bpf.c");
    if std::env::var_os("CARGO_FEATURE_XDP").is_none() {
        return;
    }
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("veil.bpf.o");
    // <asm/types.h> lives under the host's multiarch include directory.
    let multiarch = Command::new("cc")
        .arg("-dumpmachine")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "x86_64-linux-gnu".into());
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I/usr/include/{multiarch}"))
        .args(["-c", "xdp/veil.bpf.c", "-o"])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{clang} failed to build xdp/veil.bpf.c ({s})"),
        Err(e) => panic!(
            "the `xdp` feature needs clang and libbpf's headers (Debian: apt-get install clang \
             libbpf-dev): running {clang}: {e}"
        ),
    }
}
