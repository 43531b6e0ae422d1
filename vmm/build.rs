//! Builds the guest init of `minivmm run` (`guest-init/`, binary
//! `minivmm-init`) as a static x86-64 program and leaves it at
//! `$OUT_DIR/minivmm-init`, for `run::init::INIT_ELF` to embed.
//!
//! The init runs in guests whose root file system may have no C library, or
//! another one, so it is linked statically. What works: a nested
//! `cargo build --release --target x86_64-unknown-linux-gnu` with
//! `-C target-feature=+crt-static` as its only rustflags (a static-pie). The
//! explicit `--target` keeps those flags off build scripts and proc macros;
//! link arguments from a build script do not give a static program.
//!
//! The nested build has its own target directory under `OUT_DIR`, so it
//! rebuilds only when the init's sources change, and shares the outer build's
//! jobserver (`CARGO_MAKEFLAGS`).

use std::env;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const PACKAGE: &str = "minivmm-guest-init";
const BINARY: &str = "minivmm-init";
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// What the outer build may have set that must not reach the nested one:
/// other rustflags (they would replace ours, or be added to them), its target
/// directory, and `cargo clippy`'s wrapper (the init is linted as a member
/// of the workspace anyway; through the wrapper it would be rebuilt at every
/// switch between `cargo build` and `cargo clippy`).
const CLEARED_ENV: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET_DIR",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
    "CLIPPY_ARGS",
];

fn main() {
    if let Err(e) = run() {
        eprintln!("error: building the guest init ({PACKAGE}) failed: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let var = |name: &str| env::var_os(name).ok_or(format!("${name} is not set"));
    let out_dir = PathBuf::from(var("OUT_DIR")?);
    let manifest_dir = PathBuf::from(var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir
        .parent()
        .ok_or("the vmm crate is not in a workspace")?;

    // Directories: cargo looks at every file in them. The workspace's
    // manifest and lock file hold the init's profile and dependencies.
    for path in [
        "../guest-init",
        "../run-protocol",
        "../Cargo.toml",
        "../Cargo.lock",
        "build.rs",
    ] {
        println!("cargo:rerun-if-changed={path}");
    }

    let target_dir = out_dir.join("init-target");
    let mut cargo = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo
        .arg("build")
        .args(["--release", "--locked", "--offline"])
        .args(["-p", PACKAGE, "--bin", BINARY, "--target", TARGET])
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    for name in CLEARED_ENV {
        cargo.env_remove(name);
    }
    cargo
        .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static")
        // Smaller: the init's symbols help nobody in the guest.
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        // Cargo's messages go to stderr, shown if this fails; nothing may go
        // to our stdout, which cargo reads for `cargo:` lines.
        .stdout(Stdio::from(io::stderr()));
    let status = cargo.status().map_err(|e| format!("run {cargo:?}: {e}"))?;
    if !status.success() {
        return Err(format!("{cargo:?}: {status} (its messages are above)"));
    }

    let built = target_dir.join(TARGET).join("release").join(BINARY);
    let dest = out_dir.join(BINARY);
    copy(&built, &dest)
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::copy(from, to)
        .map(drop)
        .map_err(|e| format!("copy {} to {}: {e}", from.display(), to.display()))
}
