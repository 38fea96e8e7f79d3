//! `xdp-agent-ctl`: inspects a running xdp-agent through its gRPC socket:
//! the channel bindings in the kernel's maps, the data plane's counters, its
//! configuration and the agent's health.

mod args;
mod render;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use clap::{Parser, Subcommand};
use proto::v1::{
    ChannelBinding, CountersRequest, GetChannelBindingRequest, GetConfigRequest, HealthRequest,
    ListChannelBindingsRequest,
};
use tonic::Code;

use crate::args::AddressFilter;

const EXIT_STATUS: &str = "\
Exit status:
  0  success
  1  usage or any other error
  2  the agent is unreachable (its socket is missing, refuses connections or
     does not answer in time)
  3  not found (`binding` of a client and channel that have no binding)
  4  ambiguous (`binding` of a client and channel that have bindings on
     several listeners: choose one with --listener)";

/// Inspects a running xdp-agent: channel bindings, counters, configuration
/// and health.
#[derive(Debug, Parser)]
#[command(version, after_long_help = EXIT_STATUS)]
struct Cli {
    /// The agent's gRPC unix socket.
    #[arg(
        long,
        global = true,
        env = "XDP_AGENT_SOCKET",
        default_value = "/run/xdp-turn/agent.sock",
        value_name = "PATH"
    )]
    socket: PathBuf,

    /// Give up when the agent has not answered within this many seconds.
    #[arg(
        long,
        global = true,
        default_value_t = 10,
        value_name = "SECONDS",
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    timeout: u64,

    #[command(subcommand)]
    action: Action,
}

/// What to ask the agent for (the subcommand).
#[derive(Debug, Subcommand)]
enum Action {
    /// Lists the channel bindings the kernel's maps hold, whether datagrams
    /// to the peer leave with DF set (DF: the allocation asked for
    /// DONT-FRAGMENT), what is left of each one's lifetime (LIFETIME, in
    /// seconds; "expired" once it has passed and until the agent deletes it),
    /// what the kernel relayed on it each way (TO-PEER, TO-CLIENT:
    /// packets/application bytes, exact), what its rate limits dropped
    /// (DROPPED) and its limits (LIMIT, bytes per second each way).
    Bindings {
        /// Only bindings of this client (an IP alone matches every port).
        #[arg(long, value_name = "IP[:PORT]")]
        client: Option<AddressFilter>,
        /// Only bindings to this peer (an IP alone matches every port).
        #[arg(long, value_name = "IP[:PORT]")]
        peer: Option<AddressFilter>,
        /// Only bindings of this allocation port.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
        port: Option<u16>,
        /// Print a JSON array of {client, listener, channel, peer,
        /// allocation_port, dont_fragment, lifetime_ms, usage: {client_to_peer,
        /// peer_to_client, dropped_client_to_peer, dropped_peer_to_client:
        /// {packets, bytes}}, rate_limits: [{meter, bytes_per_second}]}.
        #[arg(long)]
        json: bool,
    },
    /// Shows the binding of a client's channel and what is left of its lifetime.
    Binding {
        /// The client's transport address, IP:PORT ([IP]:PORT for IPv6).
        #[arg(value_parser = args::parse_socket_addr)]
        client: SocketAddr,
        /// The channel number, decimal or hexadecimal (0x4000-0x7FFF).
        #[arg(value_parser = args::parse_channel)]
        channel: u16,
        /// The server transport address the client sends to, needed when the
        /// client has bindings of the channel on several listeners.
        #[arg(long, value_name = "IP:PORT", value_parser = args::parse_socket_addr)]
        listener: Option<SocketAddr>,
        /// Print a JSON object as one element of `bindings --json`.
        #[arg(long)]
        json: bool,
    },
    /// Shows the data plane's counters, summed over CPUs, and how many
    /// bindings expired.
    Counters {
        /// Print a JSON object (it always holds every counter).
        #[arg(long)]
        json: bool,
        /// Also list the counters that are zero.
        #[arg(long)]
        all: bool,
    },
    /// Shows the data-plane configuration in force.
    Config {
        /// Print a JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Shows the agent's version, attachments, generation, capacity and uptime.
    Health {
        /// Print a JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// Failures with their own exit status.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// The agent's socket is missing, refuses connections or stays silent.
    #[error(
        "cannot reach the agent at {}: {reason}; check that the xdp-agent service runs \
         (systemctl status xdp-agent) or choose its socket with --socket",
        socket.display()
    )]
    Unreachable { socket: PathBuf, reason: String },
    /// What was asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Several things match what was asked for; the message says how to choose.
    #[error("{0}")]
    Ambiguous(String),
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Self::Unreachable { .. } => 2,
            Self::NotFound(_) => 3,
            Self::Ambiguous(_) => 4,
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            // --help and --version print to stdout and succeed; usage errors
            // exit 1 (clap's own 2 is ours for an unreachable agent).
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|runtime| runtime.block_on(run(&cli)));
    let output = match result {
        Ok(output) => output,
        Err(error) => {
            eprintln!("xdp-agent-ctl: {error:#}");
            let code = error
                .downcast_ref::<Failure>()
                .map_or(1, Failure::exit_code);
            return ExitCode::from(code);
        }
    };
    match std::io::stdout().lock().write_all(output.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that stopped early (`| head`) got what it wanted.
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xdp-agent-ctl: cannot write the output: {error}");
            ExitCode::from(1)
        }
    }
}

/// Performs the action within the deadline; what it prints.
async fn run(cli: &Cli) -> anyhow::Result<String> {
    let deadline = Duration::from_secs(cli.timeout);
    tokio::time::timeout(deadline, perform(cli))
        .await
        .unwrap_or_else(|_| {
            Err(Failure::Unreachable {
                socket: cli.socket.clone(),
                reason: format!("no answer within {}s", cli.timeout),
            }
            .into())
        })
}

/// Asks the agent for what `cli.action` wants; the output to print.
async fn perform(cli: &Cli) -> anyhow::Result<String> {
    let mut agent = connect(&cli.socket).await?;
    let socket = cli.socket.as_path();
    match cli.action {
        Action::Bindings {
            client,
            peer,
            port,
            json,
        } => list_bindings(&mut agent, socket, client, peer, port, json).await,
        Action::Binding {
            client,
            channel,
            listener,
            json,
        } => show_binding(&mut agent, socket, client, channel, listener, json).await,
        Action::Counters { json, all } => {
            let answer = agent.counters(CountersRequest {}).await;
            let counters = answer_of(socket, "Counters", answer)?;
            Ok(render_as(json, &counters, render::counters_json, |c| {
                render::counters_text(c, all)
            }))
        }
        Action::Config { json } => {
            let answer = agent.get_config(GetConfigRequest {}).await;
            let config = answer_of(socket, "GetConfig", answer)?;
            Ok(render_as(
                json,
                &config,
                render::config_json,
                render::config_text,
            ))
        }
        Action::Health { json } => {
            let answer = agent.health(HealthRequest {}).await;
            let health = answer_of(socket, "Health", answer)?;
            Ok(render_as(
                json,
                &health,
                render::health_json,
                render::health_text,
            ))
        }
    }
}

/// `bindings`: the bindings that pass the (client, peer, allocation port) filters.
async fn list_bindings(
    agent: &mut proto::DataPlaneClient,
    socket: &Path,
    client: Option<AddressFilter>,
    peer: Option<AddressFilter>,
    port: Option<u16>,
    json: bool,
) -> anyhow::Result<String> {
    let request = ListChannelBindingsRequest {
        client: client.map(|f| f.to_string()).unwrap_or_default(),
        peer: peer.map(|f| f.to_string()).unwrap_or_default(),
        allocation_port: port.map_or(0, u32::from),
    };
    let answer = agent.list_channel_bindings(request).await;
    let mut bindings = answer_of(socket, "ListChannelBindings", answer)?.bindings;
    // The agent filters too; filtering here as well keeps the output
    // right with agents that ignore a filter.
    bindings.retain(|b| {
        client.is_none_or(|f| f.matches(&b.client))
            && peer.is_none_or(|f| f.matches(&b.peer))
            && port.is_none_or(|p| b.allocation_port == u32::from(p))
    });
    render::sort_bindings(&mut bindings);
    Ok(render_as(
        json,
        bindings.as_slice(),
        render::bindings_json,
        render::bindings_table,
    ))
}

/// `binding`: the binding of a client's channel (on `listener` if given);
/// [`Failure::NotFound`] if none, [`Failure::Ambiguous`] if the client has
/// bindings of the channel on several listeners and none was given.
async fn show_binding(
    agent: &mut proto::DataPlaneClient,
    socket: &Path,
    client: SocketAddr,
    channel: u16,
    listener: Option<SocketAddr>,
    json: bool,
) -> anyhow::Result<String> {
    let request = GetChannelBindingRequest {
        client: client.to_string(),
        channel: u32::from(channel),
        listener: listener.map(|l| l.to_string()).unwrap_or_default(),
    };
    let binding: ChannelBinding = match agent.get_channel_binding(request).await {
        Err(status) if status.code() == Code::NotFound => {
            let on = listener
                .map(|l| format!(" (listener {l})"))
                .unwrap_or_default();
            return Err(Failure::NotFound(format!(
                "no binding for {client} on channel {}{on}",
                render::channel_hex(u32::from(channel))
            ))
            .into());
        }
        // The agent's message lists the listeners to choose from.
        Err(status) if status.code() == Code::FailedPrecondition && listener.is_none() => {
            return Err(
                Failure::Ambiguous(format!("{} (--listener IP:PORT)", status.message())).into(),
            );
        }
        answer => answer_of(socket, "GetChannelBinding", answer)?,
    };
    Ok(render_as(
        json,
        &binding,
        render::binding_json,
        render::binding_text,
    ))
}

/// `value` as pretty JSON when `json` is set, else as text.
fn render_as<T: ?Sized>(
    json: bool,
    value: &T,
    as_json: impl FnOnce(&T) -> serde_json::Value,
    as_text: impl FnOnce(&T) -> String,
) -> String {
    if json {
        render::json_text(&as_json(value))
    } else {
        as_text(value)
    }
}

/// Connects to the agent; a missing or refusing socket is [`Failure::Unreachable`].
async fn connect(socket: &Path) -> anyhow::Result<proto::DataPlaneClient> {
    let error = match proto::connect(socket).await {
        Ok(client) => return Ok(client),
        Err(error) => error,
    };
    // The connector's I/O error is somewhere in the transport error's chain.
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    let io = std::iter::from_fn(|| {
        let current = source?;
        source = current.source();
        Some(current)
    })
    .find_map(|e| e.downcast_ref::<std::io::Error>());
    let Some(io) = io else {
        // No I/O error: the connection was made, then closed.
        return Err(anyhow!(
            "cannot connect: {}",
            closed_by_the_agent(socket, &error.to_string())
        ));
    };
    use std::io::ErrorKind;
    if matches!(
        io.kind(),
        ErrorKind::BrokenPipe
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::UnexpectedEof
    ) {
        return Err(anyhow!(
            "cannot connect: {}",
            closed_by_the_agent(socket, &io_reason(io))
        ));
    }
    if io.kind() == ErrorKind::PermissionDenied {
        return Err(anyhow!(
            "cannot connect to the agent at {}: permission denied; the socket is for root \
             and the agent's group (--grpc-group)",
            socket.display()
        ));
    }
    Err(Failure::Unreachable {
        socket: socket.to_owned(),
        reason: io_reason(io),
    }
    .into())
}

/// Why the agent may have closed a connection it accepted, after `what` the
/// transport said.
fn closed_by_the_agent(socket: &Path, what: &str) -> String {
    format!(
        "the agent at {} closed the connection ({what}); it serves root, its own user and \
         --grpc-user, or without it the users whose primary group is --grpc-group (its log \
         says \"gRPC connection refused\")",
        socket.display()
    )
}

/// An I/O error without Rust's "(os error N)" suffix.
fn io_reason(error: &std::io::Error) -> String {
    match error.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_owned(),
        None => error.to_string(),
    }
}

/// The message of an answer, or an error naming the RPC.
fn answer_of<T>(
    socket: &Path,
    rpc: &str,
    answer: Result<tonic::Response<T>, tonic::Status>,
) -> anyhow::Result<T> {
    let status = match answer {
        Ok(response) => return Ok(response.into_inner()),
        Err(status) => status,
    };
    Err(match status.code() {
        Code::Unavailable => Failure::Unreachable {
            socket: socket.to_owned(),
            reason: status.message().to_owned(),
        }
        .into(),
        Code::Unimplemented => anyhow!(
            "the agent at {} does not serve {rpc}; is it older than xdp-agent-ctl?",
            socket.display()
        ),
        Code::NotFound => Failure::NotFound(format!("{rpc}: {}", status.message())).into(),
        // What a client sees of a connection the agent closed at once (the
        // one or the other, by timing): its peer credentials are not ones the
        // agent serves.
        Code::Cancelled | Code::Unknown => {
            anyhow!("{rpc}: {}", closed_by_the_agent(socket, status.message()))
        }
        code => anyhow!("{rpc} failed ({code:?}): {}", status.message()),
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_closed_connection_points_at_the_served_users() {
        let cancelled = answer_of::<()>(
            Path::new("/run/xdp-turn/agent.sock"),
            "Health",
            Err(tonic::Status::cancelled("operation was canceled")),
        )
        .unwrap_err()
        .to_string();
        assert!(
            cancelled.starts_with(
                "Health: the agent at /run/xdp-turn/agent.sock closed the connection \
                 (operation was canceled); it serves root"
            ) && cancelled.contains("--grpc-group"),
            "{cancelled}"
        );
    }

    #[test]
    fn long_help_documents_exit_status() {
        let help = Cli::command().render_long_help().to_string();
        for line in [
            "0  success",
            "1  usage",
            "2  the agent is unreachable",
            "3  not found",
            "4  ambiguous",
        ] {
            assert!(help.contains(line), "{help}");
        }
    }

    #[test]
    fn parses_subcommands_and_global_socket() {
        let cli = Cli::try_parse_from([
            "xdp-agent-ctl",
            "binding",
            "[2001:db8::2]:40000",
            "0x4001",
            "--json",
            "--socket",
            "/tmp/a.sock",
        ])
        .unwrap();
        assert_eq!(cli.socket, Path::new("/tmp/a.sock"));
        let Action::Binding {
            client,
            channel,
            listener,
            json,
        } = cli.action
        else {
            panic!("not binding: {:?}", cli.action);
        };
        assert_eq!(client, "[2001:db8::2]:40000".parse().unwrap());
        assert_eq!((channel, listener, json), (0x4001, None, true));

        let cli = Cli::try_parse_from([
            "xdp-agent-ctl",
            "binding",
            "192.0.2.2:40000",
            "16385",
            "--listener",
            "203.0.113.10:443",
        ])
        .unwrap();
        let Action::Binding { listener, .. } = cli.action else {
            panic!("not binding: {:?}", cli.action);
        };
        assert_eq!(listener, Some("203.0.113.10:443".parse().unwrap()));

        let cli = Cli::try_parse_from([
            "xdp-agent-ctl",
            "bindings",
            "--client",
            "192.0.2.2",
            "--peer",
            "198.51.100.2:5000",
            "--port",
            "49160",
        ])
        .unwrap();
        let Action::Bindings {
            client, peer, port, ..
        } = cli.action
        else {
            panic!("not bindings: {:?}", cli.action);
        };
        assert_eq!(client.map(|f| f.to_string()).as_deref(), Some("192.0.2.2"));
        assert_eq!(
            peer.map(|f| f.to_string()).as_deref(),
            Some("198.51.100.2:5000")
        );
        assert_eq!(port, Some(49160));
    }

    #[test]
    fn rejects_bad_values() {
        for args in [
            &["xdp-agent-ctl", "binding", "192.0.2.2:1", "0x3fff"][..],
            &["xdp-agent-ctl", "binding", "192.0.2.2:1", "0x8000"],
            &["xdp-agent-ctl", "binding", "192.0.2.2", "0x4001"],
            &[
                "xdp-agent-ctl",
                "binding",
                "192.0.2.2:1",
                "0x4001",
                "--listener",
                "203.0.113.10",
            ],
            &["xdp-agent-ctl", "bindings", "--port", "0"],
            &["xdp-agent-ctl", "bindings", "--client", "nope"],
            &["xdp-agent-ctl"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
    }

    #[test]
    fn io_reasons_have_no_os_error_suffix() {
        let error = std::io::Error::from_raw_os_error(nix::libc::ENOENT);
        assert_eq!(io_reason(&error), "No such file or directory");
        let error = std::io::Error::other("custom");
        assert_eq!(io_reason(&error), "custom");
    }
}
