use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cfg = match ringcast::config::Config::load(std::env::args_os().collect()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("ringcast: {e}");
            return ExitCode::from(2);
        }
    };
    let mut logger = env_logger::Builder::new();
    logger.filter_level(cfg.log_level).parse_env("RINGCAST_LOG");
    if cfg.log_format == ringcast::config::LogFormat::Json {
        logger.format(|buf, record| {
            use std::io::Write;
            let line = serde_json::json!({
                "ts": buf.timestamp_micros().to_string(),
                "level": record.level().as_str(),
                "target": record.target(),
                "msg": record.args().to_string(),
            });
            writeln!(buf, "{line}")
        });
    }
    logger.init();
    log::debug!("effective config: {}", cfg.redacted());
    match ringcast::server::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("ringcast: {e}");
            ExitCode::FAILURE
        }
    }
}
