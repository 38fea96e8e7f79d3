//! `turn-control`: the TURN relay daemon (RFC 8656). It wraps the sans-IO `turn-core` in one
//! tokio event loop with batched UDP I/O, TURN over TCP, Prometheus metrics, a TOML
//! configuration and the gRPC link to the xdp-agent.

mod agent;
mod config;
mod eventloop;
mod metrics;
mod tcp;
mod udp;

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use tracing_subscriber::EnvFilter;

use crate::config::{Cli, LogFormat, Settings, User};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            use clap::error::ErrorKind;
            return match error.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = error.print();
                    ExitCode::SUCCESS
                }
                _ => {
                    eprintln!("turn-control: {} (see --help)", one_line(&error));
                    ExitCode::from(2)
                }
            };
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("turn-control: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load(&cli)?;
    if cli.print_config {
        print!("{}", settings.to_toml());
        return Ok(());
    }
    init_tracing(&settings)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("turn-control-io")
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    // The event loop runs on this thread (block_on); TCP connections, the agent link and the
    // metrics endpoint run on the runtime's worker threads.
    runtime.block_on(async move {
        let dev_user = settings.dev.then(dev_credential).transpose()?;
        if let Some(addr) = settings.metrics {
            metrics::install(addr)?;
        }
        let announce = dev_user.clone().map(|u| (u, settings.clone()));
        let eventloop = eventloop::Eventloop::new(cli, settings, dev_user)?;
        if let Some((user, settings)) = announce {
            print_dev_banner(&user, &settings);
        }
        eventloop.run().await
    })
}

fn init_tracing(settings: &Settings) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&settings.log_level)
        .map_err(|e| anyhow::anyhow!("log_level: \"{}\": {e}", settings.log_level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match settings.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

/// A random password for the development user.
fn dev_credential() -> anyhow::Result<User> {
    use rand::TryRng as _;
    let mut bytes = [0u8; 12];
    rand::rngs::SysRng
        .try_fill_bytes(&mut bytes)
        .context("generating the development password")?;
    let password: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(User {
        name: config::DEV_USER.to_owned(),
        password,
    })
}

fn print_dev_banner(user: &User, settings: &Settings) {
    let listen = settings
        .listen
        .first()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let host = settings
        .listen
        .first()
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    let port = settings
        .listen
        .first()
        .map_or(config::DEFAULT_PORT, |a| a.port());
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "turn-control development relay on {listen} (UDP and TCP); loopback peers allowed"
    );
    let _ = writeln!(out, "  username: {}", user.name);
    let _ = writeln!(out, "  password: {}", user.password);
    let _ = writeln!(out, "  realm:    {}", settings.realm);
    if let Some(metrics) = settings.metrics {
        let _ = writeln!(out, "  metrics:  http://{metrics}/metrics");
    }
    let _ = writeln!(
        out,
        "  try:      turnutils_uclient -u {} -w {} -p {port} -y {host}",
        user.name, user.password
    );
    let _ = out.flush();
    tracing::info!(username = %user.name, password = %user.password, realm = %settings.realm, "development credential");
}

/// The first line of a clap error without its `error: ` prefix.
fn one_line(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    let line = rendered.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}
