//! Regenerates `src/gen` from `veil/v1/*.proto` with a pure-Rust protobuf compiler (protox, so no
//! system `protoc` is needed) and fails if the checked-in code differs. Run
//! `VEIL_BLESS=1 cargo test -p veil-proto --test bootstrap` after editing a `.proto` file.

use std::path::{Path, PathBuf};

#[test]
fn generated_code_is_fresh() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let protos: Vec<PathBuf> = [
        "veil/v1/session.proto",
        "veil/v1/registry.proto",
        "veil/v1/admin.proto",
        "veil/v1/replica.proto",
    ]
    .iter()
    .map(|p| root.join(p))
    .collect();
    let fds = protox::compile(&protos, [root]).expect("compile protos");

    let out = tempdir(root);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .emit_rerun_if_changed(false)
        .out_dir(&out)
        .compile_fds(fds.clone())
        .expect("generate code");
    let descriptor = prost::Message::encode_to_vec(&fds);
    std::fs::write(out.join("veil_descriptor.bin"), descriptor).unwrap();

    let gen_dir = root.join("src/gen");
    let mut stale = Vec::new();
    for name in ["veil.v1.rs", "veil_descriptor.bin"] {
        let fresh = std::fs::read(out.join(name)).unwrap();
        let current = std::fs::read(gen_dir.join(name)).unwrap_or_default();
        if fresh != current {
            if std::env::var_os("VEIL_BLESS").is_some() {
                std::fs::create_dir_all(&gen_dir).unwrap();
                std::fs::write(gen_dir.join(name), &fresh).unwrap();
            } else {
                stale.push(name);
            }
        }
    }
    std::fs::remove_dir_all(&out).ok();
    assert!(
        stale.is_empty(),
        "generated code is stale: {stale:?}; run VEIL_BLESS=1 cargo test -p veil-proto --test bootstrap"
    );
}

fn tempdir(root: &Path) -> PathBuf {
    let dir = root
        .join("..")
        .join("target")
        .join(format!("proto-bootstrap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
