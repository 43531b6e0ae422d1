//! The `minivmm` binary.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use minivmm::cli::Cli;
use minivmm::config::VmConfig;
use minivmm::vmm;

fn main() -> ExitCode {
    vmm::ensure_std_fds();
    let cli = Cli::parse();
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
