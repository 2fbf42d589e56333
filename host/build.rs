//! Builds the reference rule (`guest/rules/reservation`) into a component and leaves it in
//! `OUT_DIR`, so the `turnstile` binary embeds it and `turnstile run` works with no rule file.

use std::path::PathBuf;

use turnstile_guest_build::GuestBuild;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
    let workspace = manifest_dir.parent().unwrap().to_path_buf();

    for watched in [
        "wit",
        "guest/src",
        "guest/Cargo.toml",
        "guest/rules/reservation",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join(watched).display()
        );
    }

    let build = GuestBuild {
        manifest_path: workspace.join("Cargo.toml"),
        target_dir: guest_target_dir(&out_dir),
        cargo: std::env::var_os("CARGO").unwrap().into(),
        quiet: true,
    };
    let built = build
        .build(&["reservation"])
        .unwrap_or_else(|e| panic!("building the reference rule: {e:#}"));
    std::fs::copy(&built[0].path, out_dir.join("reservation.wasm")).unwrap();
}

/// One wasm target dir beside the outer build's target dir (`<target>/guests`), shared by every
/// build script that builds guests, so each guest is compiled once however many crates need it.
fn guest_target_dir(out_dir: &std::path::Path) -> PathBuf {
    // OUT_DIR is <target>/<profile>/build/<package>-<hash>/out.
    match out_dir.ancestors().nth(4) {
        Some(target) if target.join("CACHEDIR.TAG").exists() => target.join("guests"),
        _ => out_dir.join("guests"),
    }
}
