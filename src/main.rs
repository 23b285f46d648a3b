use clap::Parser;
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cfg = ringcast::config::Config::parse();
    env_logger::Builder::new().filter_level(cfg.log_level).parse_env("RINGCAST_LOG").init();
    match ringcast::server::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("ringcast: {e}");
            ExitCode::FAILURE
        }
    }
}
