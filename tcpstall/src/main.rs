//! `tcpstall` entry point: parse the command line, set up logging, dispatch.
use std::process::ExitCode;

use clap::Parser as _;
use tcpstall::{
    app,
    cli::{
        config::{Cli, Command, LogFormat, Settings},
        doctor, top,
    },
};

fn init_tracing(format: LogFormat, level: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let filter = tracing_subscriber::EnvFilter::try_new(level).with_context(|| {
        format!("invalid --log-level {level:?} (examples: info, debug, tcpstall=debug)")
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}

fn real_main() -> anyhow::Result<()> {
    use anyhow::Context as _;
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let settings = Settings::resolve(&args)?;
            init_tracing(settings.log_format, &settings.log_level)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            rt.block_on(app::run(settings))
        }
        Command::Doctor(args) => {
            init_tracing(
                args.common.log_format.unwrap_or_default(),
                args.common.log_level.as_deref().unwrap_or("warn"),
            )?;
            doctor::doctor(&args)
        }
        Command::Top(args) => top::top(&args),
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcpstall: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
