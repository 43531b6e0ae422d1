//! The `minivmm` binary.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use minivmm::cli::Cli;
use minivmm::config::VmConfig;
use minivmm::run::cli::RunCli;
use minivmm::vmm;

fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format(|buf, record| {
            writeln!(
                buf,
                "minivmm: {}: {}\r",
                record.level().as_str().to_lowercase(),
                record.args()
            )
        })
        .init();
}

fn main() -> ExitCode {
    let spawned = std::time::Instant::now();
    vmm::ensure_std_fds();
    // `minivmm run ...`: a command in a fresh guest.
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new("run")) {
        let args = std::iter::once("minivmm run".into()).chain(std::env::args_os().skip(2));
        let cli = RunCli::parse_from(args);
        init_logging();
        return ExitCode::from(minivmm::run::runner::execute(cli, spawned));
    }
    let cli = Cli::parse();
    init_logging();
    match vmm::run(VmConfig::from(cli)) {
        Ok(outcome) => {
            if let Some(msg) = outcome.message() {
                eprintln!("minivmm: {msg}");
            }
            ExitCode::from(outcome.exit_code() as u8)
        }
        Err(e) => {
            eprintln!("minivmm: error: {}", minivmm::error::error_chain(&e));
            ExitCode::from(1)
        }
    }
}
