//! The deployment files under `deploy/` and `make install-files`:
//! - the systemd units pass `systemd-analyze verify` (with their binaries
//!   replaced by stubs in a temporary directory, so no build and no running
//!   systemd are needed) and keep the properties the design relies on;
//! - the flags in the units and in `xdp-agent.env` are ones the built binaries
//!   accept, and the example configuration parses;
//! - Prometheus configuration, rules and rule unit tests pass `promtool`;
//! - the Grafana dashboard is valid JSON and every query in it is valid PromQL;
//! - every metric the rules and the dashboard query is one the daemons export;
//! - `make install-files DESTDIR=... PREFIX=/usr` lands every file, rewrites the
//!   units' paths and never overwrites an existing configuration; the sysusers
//!   and tmpfiles entries apply to that tree.
//!
//! A missing tool (systemd-analyze, promtool, python3, make, systemd-sysusers)
//! makes a test fail under `CI=true` and print a loud SKIPPED line otherwise.
#![expect(clippy::unwrap_used, reason = "a test: failures should panic")]

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, ensure};
use tests::files::{TempDir, deploy, read, repo, run};
use tests::required_tool;

/// Executable stand-ins for the installed binaries.
fn stub_binaries(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    for name in ["turn-control", "xdp-agent", "xdp-agent-ctl"] {
        let path = dir.join(name);
        fs::write(&path, "#!/bin/sh\nexit 0\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// The values of `key=` lines in a unit.
fn unit_values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

/// `systemd-analyze verify` on copies of the units in `dir`; the complaints about
/// them (stderr lines naming them), if any.
fn verify_units(analyze: &Path, dir: &Path, units: &[&str]) -> anyhow::Result<Vec<String>> {
    let output = Command::new(analyze)
        .arg("verify")
        .arg("--man=no")
        .args(units.iter().map(|unit| dir.join(unit)))
        .current_dir(dir)
        .env_remove("SYSTEMD_LOG_LEVEL")
        .output()
        .context("cannot run systemd-analyze")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let complaints: Vec<String> = stderr
        .lines()
        .filter(|line| {
            line.contains(&*dir.to_string_lossy())
                || units.iter().any(|unit| line.starts_with(unit))
        })
        .map(str::to_owned)
        .collect();
    ensure!(
        output.status.success() || !complaints.is_empty(),
        "systemd-analyze verify failed ({}) without naming the units:\n{stderr}",
        output.status
    );
    Ok(complaints)
}

#[test]
fn systemd_units_pass_verify() -> anyhow::Result<()> {
    let Some(analyze) = required_tool("systemd-analyze", "systemd_units_pass_verify") else {
        return Ok(());
    };
    let dir = TempDir::new("units");
    let bin = dir.0.join("bin");
    stub_binaries(&bin);
    let units = ["xdp-agent.service", "turn-control.service"];
    for unit in units {
        let text = read(&deploy(&format!("systemd/{unit}")));
        assert!(
            text.contains("/usr/local/bin/"),
            "{unit}: ExecStart not in /usr/local/bin"
        );
        let text = text.replace("/usr/local/bin/", &format!("{}/", bin.display()));
        fs::write(dir.0.join(unit), text)?;
    }
    // The TLS drop-in on top of turn-control's unit: a unit file may repeat a section, and
    // its later assignments win as a drop-in's do.
    let with_tls = "turn-control-tls.service";
    let text = fs::read_to_string(dir.0.join("turn-control.service"))?
        + &read(&deploy("systemd/turn-control.service.d/tls.conf"));
    fs::write(dir.0.join(with_tls), text)?;
    let complaints = verify_units(&analyze, &dir.0, &[&units[..], &[with_tls]].concat())?;
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify:\n{}",
        complaints.join("\n")
    );

    // The check is not vacuous: an unknown key and a missing binary are reported.
    let broken = "broken.service";
    let text = read(&deploy("systemd/turn-control.service")).replace("Restart=", "Restrat=");
    fs::write(dir.0.join(broken), text)?;
    let complaints = verify_units(&analyze, &dir.0, &[broken])?;
    assert!(
        complaints.iter().any(|line| line.contains("Restrat"))
            && complaints
                .iter()
                .any(|line| line.contains("/usr/local/bin/turn-control")),
        "a broken unit went unnoticed: {complaints:?}"
    );
    Ok(())
}

#[test]
fn units_keep_the_designed_properties() {
    let agent = read(&deploy("systemd/xdp-agent.service"));
    assert_eq!(unit_values(&agent, "Type"), ["notify"]);
    assert_eq!(unit_values(&agent, "User"), ["xdp-agent"]);
    assert_eq!(unit_values(&agent, "Group"), ["turn-control"]);
    assert_eq!(unit_values(&agent, "RuntimeDirectory"), ["xdp-turn"]);
    assert_eq!(unit_values(&agent, "RuntimeDirectoryMode"), ["0750"]);
    let capabilities = ["CAP_BPF CAP_NET_ADMIN CAP_PERFMON"];
    assert_eq!(unit_values(&agent, "AmbientCapabilities"), capabilities);
    assert_eq!(unit_values(&agent, "CapabilityBoundingSet"), capabilities);
    assert_eq!(unit_values(&agent, "ReadWritePaths"), ["/sys/fs/bpf"]);
    assert_eq!(
        unit_values(&agent, "EnvironmentFile"),
        ["/etc/xdp-turn/xdp-agent.env"]
    );
    let start = unit_values(&agent, "ExecStart").concat();
    for flag in [
        "--persist",
        "--grpc /run/xdp-turn/agent.sock",
        "--grpc-group turn-control",
        "$XDP_AGENT_ARGS",
    ] {
        assert!(
            start.contains(flag),
            "xdp-agent ExecStart lacks {flag}: {start}"
        );
    }
    // A stop must leave the program attached (--persist): nothing detaches.
    for key in ["ExecStop", "ExecStopPost"] {
        assert!(
            unit_values(&agent, key).is_empty(),
            "xdp-agent.service has {key}="
        );
    }

    let control = read(&deploy("systemd/turn-control.service"));
    assert_eq!(unit_values(&control, "Type"), ["notify"]);
    // Restarts keep allocations: the state directory outlives a restart (not a stop), and the
    // sockets wait in the store.
    assert_eq!(unit_values(&control, "RuntimeDirectory"), ["turn-control"]);
    assert_eq!(
        unit_values(&control, "RuntimeDirectoryPreserve"),
        ["restart"]
    );
    assert_eq!(unit_values(&control, "FileDescriptorStoreMax"), ["65536"]);
    assert_eq!(unit_values(&control, "User"), ["turn-control"]);
    assert_eq!(unit_values(&control, "Group"), ["turn-control"]);
    assert_eq!(unit_values(&control, "CapabilityBoundingSet"), [""]);
    assert_eq!(unit_values(&control, "AmbientCapabilities"), [""]);
    // For port 443 the TLS drop-in grants one capability, which the daemon drops once its
    // listeners are bound, and a group to read certificates it does not own.
    let tls = read(&deploy("systemd/turn-control.service.d/tls.conf"));
    assert_eq!(
        unit_values(&tls, "CapabilityBoundingSet"),
        ["CAP_NET_BIND_SERVICE"]
    );
    assert_eq!(
        unit_values(&tls, "AmbientCapabilities"),
        ["CAP_NET_BIND_SERVICE"]
    );
    assert_eq!(unit_values(&tls, "SupplementaryGroups"), ["ssl-cert"]);
    let keys: Vec<&str> = tls
        .lines()
        .filter(|line| !line.starts_with('#') && !line.starts_with('['))
        .filter_map(|line| line.split_once('=').map(|(key, _)| key))
        .collect();
    assert_eq!(
        keys,
        [
            "CapabilityBoundingSet",
            "AmbientCapabilities",
            "SupplementaryGroups"
        ]
    );
    assert!(unit_values(&control, "DynamicUser").is_empty());
    assert_eq!(
        unit_values(&control, "ExecReload"),
        ["/bin/kill -HUP $MAINPID"]
    );
    assert!(
        unit_values(&control, "After")
            .concat()
            .contains("xdp-agent.service")
    );
    assert!(
        unit_values(&control, "Wants")
            .concat()
            .contains("xdp-agent.service")
    );
    assert!(
        unit_values(&control, "Requires").is_empty(),
        "turn-control works without the agent"
    );
    let start = unit_values(&control, "ExecStart").concat();
    assert!(
        start.contains("--config /etc/xdp-turn/turn-control.toml"),
        "{start}"
    );
    assert!(
        start.contains("--agent /run/xdp-turn/agent.sock"),
        "{start}"
    );
    assert!(start.contains("--state-dir /run/turn-control"), "{start}");
    for unit in [&agent, &control] {
        for key in [
            "NoNewPrivileges",
            "ProtectHome",
            "PrivateTmp",
            "LockPersonality",
        ] {
            assert_eq!(unit_values(unit, key), ["yes"], "{key}");
        }
        assert_eq!(unit_values(unit, "ProtectSystem"), ["strict"]);
        assert_eq!(unit_values(unit, "Restart"), ["on-failure"]);
    }
}

/// The `--flags` (with their values) that the unit's ExecStart passes.
fn exec_start_args(unit: &str) -> Vec<String> {
    let start = unit_values(unit, "ExecStart").concat();
    start
        .split_whitespace()
        .skip(1)
        .filter(|word| !word.starts_with('$'))
        .map(str::to_owned)
        .collect()
}

/// The binary, or `None` after a SKIPPED line (a failure under CI=true, where
/// `make test` builds the workspace first).
fn binary(name: &str, test: &str) -> Option<PathBuf> {
    match tests::workspace_binary(name) {
        Ok(path) => Some(path),
        Err(error) => {
            assert!(!tests::in_ci(), "{test}: {error:#}");
            eprintln!("\n*** SKIPPED {test}: {error:#} ***\n");
            None
        }
    }
}

#[test]
fn units_pass_flags_the_binaries_accept() -> anyhow::Result<()> {
    let test = "units_pass_flags_the_binaries_accept";
    let (Some(agent), Some(control)) = (binary("xdp-agent", test), binary("turn-control", test))
    else {
        return Ok(());
    };
    // clap parses every argument before it acts on --help: unknown flags and bad
    // values fail, required ones (--iface) are not demanded.
    let env = read(&deploy("xdp-agent.env"));
    let agent_args = env
        .lines()
        .find_map(|line| line.strip_prefix("XDP_AGENT_ARGS="))
        .context("xdp-agent.env sets no XDP_AGENT_ARGS")?
        .trim_matches('"');
    assert!(
        agent_args.contains("--iface"),
        "xdp-agent.env: --iface is required"
    );
    let mut args = exec_start_args(&read(&deploy("systemd/xdp-agent.service")));
    args.extend(agent_args.split_whitespace().map(str::to_owned));
    run(Command::new(&agent).args(&args).arg("--help"))?;
    run(Command::new(&agent).args(["detach", "--help"]))?;

    let args = exec_start_args(&read(&deploy("systemd/turn-control.service")));
    let args: Vec<String> = args
        .into_iter()
        .map(|arg| {
            if arg == "/etc/xdp-turn/turn-control.toml" {
                deploy("turn-control.example.toml").display().to_string()
            } else {
                arg
            }
        })
        .collect();
    let printed = run(Command::new(&control)
        .args(&args)
        .arg("--print-config")
        .env_clear())?;
    let printed = String::from_utf8_lossy(&printed.stdout);
    assert!(
        printed.contains(r#"agent = "/run/xdp-turn/agent.sock""#),
        "{printed}"
    );
    assert!(
        printed.contains(r#"metrics = "127.0.0.1:9641""#),
        "{printed}"
    );
    Ok(())
}

#[test]
fn prometheus_files_pass_promtool() -> anyhow::Result<()> {
    let Some(promtool) = required_tool("promtool", "prometheus_files_pass_promtool") else {
        return Ok(());
    };
    let dir = deploy("prometheus");
    run(Command::new(&promtool)
        .args(["check", "config", "prometheus.yml"])
        .current_dir(&dir))?;
    run(Command::new(&promtool)
        .args(["check", "rules", "alerts.yml"])
        .current_dir(&dir))?;
    run(Command::new(&promtool)
        .args(["test", "rules", "alerts_test.yml"])
        .current_dir(&dir))?;
    let config = read(&dir.join("prometheus.yml"));
    for target in ["127.0.0.1:9641", "127.0.0.1:9642"] {
        assert!(
            config.contains(target),
            "prometheus.yml does not scrape {target}"
        );
    }
    Ok(())
}

/// Lists the dashboard's queries as a rules file, checking the model on the way.
const DASHBOARD_QUERIES: &str = r#"
import json, sys
dashboard = json.load(open(sys.argv[1]))
variables = {v["name"]: v for v in dashboard["templating"]["list"]}
assert variables["datasource"]["type"] == "datasource", "no datasource variable"
assert variables["datasource"]["query"] == "prometheus", "the datasource is not Prometheus"
ids = [p["id"] for p in dashboard["panels"]]
assert len(ids) == len(set(ids)), "duplicate panel ids"
print("groups:\n- name: dashboard\n  rules:")
n = 0
for panel in dashboard["panels"]:
    if panel["type"] == "row":
        continue
    assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    assert panel["targets"], panel["title"]
    for target in panel["targets"]:
        n += 1
        expr = target["expr"].replace("$instance", ".*")
        print(f"  - record: dashboard:query{n}\n    expr: {json.dumps(expr)}")
"#;

#[test]
fn grafana_dashboard_is_valid() -> anyhow::Result<()> {
    let test = "grafana_dashboard_is_valid";
    let Some(python) = required_tool("python3", test) else {
        return Ok(());
    };
    let dashboard = deploy("grafana/xdp-turn.json");
    run(Command::new(&python)
        .args(["-m", "json.tool"])
        .arg(&dashboard))?;
    let queries = run(Command::new(&python)
        .args(["-c", DASHBOARD_QUERIES])
        .arg(&dashboard))?;
    let text = read(&dashboard);
    for expr in [
        "rate(data_relayed_ebpf_bytes_total",
        "rate(data_relayed_userspace_bytes_total",
        "xdp_packets_total",
        "turn_offload_installs_total",
        "turn_agent_connected",
        "xdp_perf_events_lost_total",
        "xdp_agent_grpc_requests_total",
        "xdp_binding_map_capacity",
    ] {
        assert!(text.contains(expr), "the dashboard does not show {expr}");
    }
    let Some(promtool) = required_tool("promtool", test) else {
        return Ok(());
    };
    let dir = TempDir::new("dashboard");
    let rules = dir.0.join("dashboard-queries.yml");
    fs::write(&rules, &queries.stdout)?;
    run(Command::new(&promtool).args(["check", "rules"]).arg(&rules))?;
    Ok(())
}

/// PromQL words with an underscore that are not metric names.
const NOT_METRICS: &[&str] = &["group_left", "group_right", "label_values", "label_replace"];

/// Metric names in the PromQL of `text`: the `expr` lines of a rules file or
/// the `"expr"` fields of the dashboard.
fn queried_metrics(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim_start();
            if let Some(expr) = line.strip_prefix("expr:") {
                return Some(expr.to_owned());
            }
            // A JSON string: unescape its quotes.
            let expr = line.strip_prefix(r#""expr":"#)?.trim();
            let expr = expr.trim_end_matches(',').trim_matches('"');
            Some(expr.replace(r#"\""#, "\""))
        })
        .flat_map(|expr| {
            // Drop label matchers' values ("...") before splitting into words.
            let unquoted: String = expr.split('"').step_by(2).collect::<Vec<_>>().join(" ");
            unquoted
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .filter(|word| {
                    word.contains('_')
                        && !word.contains(':')
                        && word.starts_with(|c: char| c.is_ascii_lowercase())
                        && !NOT_METRICS.contains(word)
                })
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn rules_and_dashboard_query_exported_metrics() {
    let sources = [
        repo().join("turn-control/src/metrics.rs"),
        repo().join("xdp-agent/src/metrics.rs"),
    ]
    .map(|path| read(&path))
    .concat();
    let rules = queried_metrics(&read(&deploy("prometheus/alerts.yml")));
    let dashboard = queried_metrics(&read(&deploy("grafana/xdp-turn.json")));
    assert!(
        rules.len() > 8 && dashboard.len() > 20,
        "{rules:?} {dashboard:?}"
    );
    let unknown: Vec<&String> = rules
        .iter()
        .chain(&dashboard)
        .filter(|metric| !sources.contains(&format!("\"{metric}\"")))
        .collect();
    assert!(unknown.is_empty(), "no daemon exports {unknown:?}");
}

#[test]
fn make_install_files_lands_everything() -> anyhow::Result<()> {
    let test = "make_install_files_lands_everything";
    let Some(make) = required_tool("make", test) else {
        return Ok(());
    };
    let dir = TempDir::new("install");
    let built = dir.0.join("built");
    stub_binaries(&built);
    let root = dir.0.join("root");
    let install = || {
        run(Command::new(&make)
            .arg("-C")
            .arg(repo())
            .args(["--no-print-directory", "install-files", "PREFIX=/usr"])
            .arg(format!("DESTDIR={}", root.display()))
            .arg(format!("BINDIR_BUILT={}", built.display()))
            .env_remove("MAKEFLAGS"))
    };
    install()?;

    let expected = [
        ("usr/bin/turn-control", 0o755),
        ("usr/bin/xdp-agent", 0o755),
        ("usr/bin/xdp-agent-ctl", 0o755),
        ("lib/systemd/system/xdp-agent.service", 0o644),
        ("lib/systemd/system/turn-control.service", 0o644),
        ("usr/lib/sysusers.d/xdp-turn.conf", 0o644),
        ("usr/lib/tmpfiles.d/xdp-turn.conf", 0o644),
        ("etc/xdp-turn/xdp-agent.env", 0o644),
        ("etc/xdp-turn/turn-control.toml", 0o640),
        ("etc/sysctl.d/90-xdp-turn.conf", 0o644),
        ("usr/share/xdp-turn/README.md", 0o644),
        ("usr/share/xdp-turn/turn-control.example.toml", 0o644),
        ("usr/share/xdp-turn/prometheus/prometheus.yml", 0o644),
        ("usr/share/xdp-turn/prometheus/alerts.yml", 0o644),
        ("usr/share/xdp-turn/grafana/xdp-turn.json", 0o644),
        (
            "usr/share/xdp-turn/systemd/turn-control.service.d/tls.conf",
            0o644,
        ),
    ];
    for (path, mode) in expected {
        let metadata = fs::metadata(root.join(path)).with_context(|| format!("{path} missing"))?;
        assert_eq!(metadata.mode() & 0o777, mode, "mode of {path}");
    }
    for unit in ["xdp-agent", "turn-control"] {
        let text = read(&root.join(format!("lib/systemd/system/{unit}.service")));
        let start = unit_values(&text, "ExecStart").concat();
        assert!(start.starts_with(&format!("/usr/bin/{unit} ")), "{start}");
        assert!(
            !text.contains("/usr/local"),
            "{unit}.service still names /usr/local"
        );
    }

    // A second install keeps the operator's configuration.
    let config = root.join("etc/xdp-turn/turn-control.toml");
    fs::write(&config, "# the operator's\n")?;
    fs::write(
        root.join("etc/xdp-turn/xdp-agent.env"),
        "XDP_AGENT_ARGS=\"--iface ens5\"\n",
    )?;
    install()?;
    assert_eq!(read(&config), "# the operator's\n");
    assert!(read(&root.join("etc/xdp-turn/xdp-agent.env")).contains("ens5"));

    // `install` builds the release binaries, then does what install-files does.
    let dry = run(Command::new(&make)
        .arg("-C")
        .arg(repo())
        .args(["-n", "--no-print-directory", "install", "PREFIX=/usr"])
        .arg(format!("DESTDIR={}", root.display()))
        .env_remove("MAKEFLAGS"))?;
    let dry = String::from_utf8_lossy(&dry.stdout);
    assert!(
        dry.contains("build --release -p turn-control -p xdp-agent")
            && dry.contains("install -m 0755"),
        "make -n install:\n{dry}"
    );

    // The sysusers entries create the users into the tree...
    let Some(sysusers) = required_tool("systemd-sysusers", test) else {
        return Ok(());
    };
    run(Command::new(&sysusers).arg(format!("--root={}", root.display())))?;
    let passwd = read(&root.join("etc/passwd"));
    let group = read(&root.join("etc/group"));
    let id = |file: &str, name: &str| -> u32 {
        file.lines()
            .find_map(|line| line.strip_prefix(&format!("{name}:x:")))
            .and_then(|rest| rest.split(':').next()?.parse().ok())
            .with_context(|| format!("{name} not created"))
            .unwrap()
    };
    let agent_uid = id(&passwd, "xdp-agent");
    let control_gid = id(&group, "turn-control");
    id(&passwd, "turn-control");
    assert!(
        group
            .lines()
            .any(|line| line.starts_with("turn-control:") && line.ends_with(":xdp-agent")),
        "xdp-agent is not a member of turn-control:\n{group}"
    );
    // ...and, as root (chown), the tmpfiles entries apply to it.
    if !nix::unistd::geteuid().is_root() {
        eprintln!("\n*** SKIPPED {test}: systemd-tmpfiles --root needs root to chown ***\n");
        return Ok(());
    }
    let Some(tmpfiles) = required_tool("systemd-tmpfiles", test) else {
        return Ok(());
    };
    run(Command::new(&tmpfiles)
        .arg(format!("--root={}", root.display()))
        .arg("--create"))?;
    let config = fs::metadata(root.join("etc/xdp-turn/turn-control.toml"))?;
    assert_eq!(
        (config.uid(), config.gid(), config.mode() & 0o777),
        (0, control_gid, 0o640)
    );
    let pins = fs::metadata(root.join("sys/fs/bpf/xdp-turn"))?;
    assert_eq!(
        (pins.uid(), pins.gid(), pins.mode() & 0o777),
        (agent_uid, control_gid, 0o700)
    );
    Ok(())
}
