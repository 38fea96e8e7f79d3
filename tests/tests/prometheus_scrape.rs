//! The shipped Prometheus configuration run for real: Debian's `prometheus`
//! scrapes the real daemons in the lab with `deploy/prometheus/prometheus.yml`
//! (its jobs, relabelling and `rule_files` as shipped; only the intervals are
//! 1s and the targets are the lab's metrics addresses) and evaluates
//! `deploy/prometheus/alerts.yml`. Through Prometheus' HTTP API:
//! - every job is up, with `instance` the host without the port;
//! - the daemons' key series have sane values (agent link up, threads,
//!   binding capacity, the program attached to the relay's interface);
//! - every group and rule of alerts.yml is loaded and evaluates with health
//!   "ok", the vector matchings of the binding-map and not-attached alerts
//!   line up with the real label sets, and nothing fires on a healthy relay;
//! - a TURN channel shows up as a binding in both daemons' series and its
//!   kernel-relayed bytes reach Prometheus.
//!
//! Prometheus runs inside the relay namespace (the daemons serve metrics on
//! its loopback). A missing `prometheus` or `promtool` makes the test fail
//! under `CI=true` and print a loud SKIPPED line otherwise.
#![expect(clippy::unwrap_used, reason = "a test: failures should panic")]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::Value;
use tests::{
    AGENT_METRICS, CLIENT_V4, Lab, Netns, PEER_V4, RELAY_IFACE, Site, TURN_CONTROL_METRICS,
    required_tool,
};

const TEST: &str = "prometheus_scrape";
/// How long anything Prometheus has to see may take (scrapes and rule
/// evaluations run every second).
const DEADLINE: Duration = Duration::from_secs(30);
/// How long a TURN round trip may take.
const T: Duration = Duration::from_secs(5);

/// The repository's `deploy/prometheus`.
fn shipped_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("deploy/prometheus")
}

/// The shipped configuration made to run in the lab: every `scrape_interval`,
/// `evaluation_interval` and `scrape_timeout` becomes 1s, relative
/// `rule_files` are made absolute against `rules_dir`, and each job's
/// `targets` become `[targets[job]]`. Everything else (job names,
/// relabelling) stays as shipped. Also returns the jobs found, in order.
///
/// The rewriting is by lines, for the layout the shipped file has; anything
/// it does not understand (a job without a target here, targets over several
/// lines) is an error, so a changed file cannot be half-rewritten silently.
fn lab_config(
    shipped: &str,
    rules_dir: &Path,
    targets: &BTreeMap<&str, &str>,
) -> anyhow::Result<(String, Vec<String>)> {
    let mut out = String::new();
    let mut jobs: Vec<String> = Vec::new();
    let mut targeted = BTreeSet::new();
    let mut in_rule_files = false;
    let mut rule_files = 0;
    for line in shipped.lines() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        let top_level = indent.is_empty() && !trimmed.is_empty() && !trimmed.starts_with('#');
        if top_level {
            in_rule_files = trimmed.starts_with("rule_files:");
        }
        let key = trimmed
            .trim_start_matches("- ")
            .split(':')
            .next()
            .unwrap_or("");
        if ["scrape_interval", "evaluation_interval", "scrape_timeout"].contains(&key) {
            writeln!(out, "{indent}{key}: 1s")?;
        } else if in_rule_files && trimmed.starts_with("- ") {
            let file = trimmed[2..].trim().trim_matches(['"', '\'']);
            let path = rules_dir.join(file);
            ensure!(
                path.is_file(),
                "rule file {} does not exist",
                path.display()
            );
            writeln!(out, "{indent}- \"{}\"", path.display())?;
            rule_files += 1;
        } else if let Some(job) = trimmed.strip_prefix("- job_name:") {
            jobs.push(job.trim().trim_matches(['"', '\'']).to_owned());
            writeln!(out, "{line}")?;
        } else if key == "targets" {
            let job = jobs.last().context("targets outside a job")?;
            ensure!(
                trimmed.contains('[') && trimmed.trim_end().ends_with(']'),
                "job {job}: targets not on one line: {line}"
            );
            let target = targets
                .get(job.as_str())
                .with_context(|| format!("the lab has no target for job {job}"))?;
            ensure!(
                targeted.insert(job.clone()),
                "job {job}: several targets lines"
            );
            let dash = if trimmed.starts_with("- ") { "- " } else { "" };
            writeln!(out, "{indent}{dash}targets: [\"{target}\"]")?;
        } else {
            writeln!(out, "{line}")?;
        }
    }
    ensure!(rule_files > 0, "no rule_files in the shipped configuration");
    for job in &jobs {
        ensure!(targeted.contains(job), "job {job} has no targets line");
    }
    Ok((out, jobs))
}

/// The names of the groups and of the rules (alerts and records) in a rules file.
fn rule_names(rules: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let value = |line: &str, key: &str| {
        let rest = line.trim_start().strip_prefix(key)?;
        Some(rest.trim().trim_matches(['"', '\'']).to_owned())
    };
    let groups = rules.lines().filter_map(|l| value(l, "- name:")).collect();
    let names = rules
        .lines()
        .filter_map(|l| value(l, "- alert:").or_else(|| value(l, "- record:")))
        .collect();
    (groups, names)
}

/// `GET path` over HTTP/1.0 from inside `netns`; the status and the body.
fn http_get(netns: &Netns, address: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let request = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n");
    netns.enter(move || {
        let mut stream = TcpStream::connect_timeout(&address, T)?;
        stream.set_read_timeout(Some(T))?;
        stream.set_write_timeout(Some(T))?;
        stream.write_all(request.as_bytes())?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        let response = String::from_utf8(response).context("the response is not UTF-8")?;
        let (head, body) = response.split_once("\r\n\r\n").context("no HTTP body")?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .with_context(|| format!("no HTTP status in {head:?}"))?;
        Ok((status, body.to_owned()))
    })
}

/// Percent-encodes a query parameter's value.
fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(byte).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// One sample of an instant vector: its labels and value.
#[derive(Debug)]
struct Sample {
    labels: BTreeMap<String, String>,
    value: f64,
}

impl Sample {
    fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// Prometheus' HTTP API inside a namespace.
#[derive(Clone, Copy)]
struct Api<'lab> {
    netns: &'lab Netns,
    address: SocketAddr,
}

impl Api<'_> {
    fn get(self, path: &str) -> anyhow::Result<(u16, String)> {
        http_get(self.netns, self.address, path)
    }

    /// `GET /api/v1/<path>`: its `data`, after checking `status: success`.
    fn v1(self, path: &str) -> anyhow::Result<Value> {
        let (status, body) = self.get(&format!("/api/v1/{path}"))?;
        let json: Value = serde_json::from_str(&body)
            .with_context(|| format!("/api/v1/{path}: {status} {body}"))?;
        ensure!(
            status == 200 && json["status"] == "success",
            "/api/v1/{path}: {status} {body}"
        );
        Ok(json["data"].clone())
    }

    /// An instant query's vector.
    fn query(self, promql: &str) -> anyhow::Result<Vec<Sample>> {
        let data = self.v1(&format!("query?query={}", url_encode(promql)))?;
        ensure!(
            data["resultType"] == "vector",
            "{promql}: not a vector: {data}"
        );
        let mut samples = Vec::new();
        for item in data["result"].as_array().context("no result")? {
            let labels = item["metric"]
                .as_object()
                .context("no metric")?
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect();
            let value = item["value"][1]
                .as_str()
                .with_context(|| format!("{promql}: no value in {item}"))?
                .parse()?;
            samples.push(Sample { labels, value });
        }
        Ok(samples)
    }
}

/// A Prometheus server in a namespace, with its configuration, TSDB and log in
/// a temporary directory. Dropping it (also on panic) kills the server, shows
/// its log if the test is failing, and removes the directory.
struct Prometheus<'lab> {
    api: Api<'lab>,
    dir: PathBuf,
    child: Option<Child>,
}

impl<'lab> Prometheus<'lab> {
    /// The directory, created empty, and a free port in `netns`; nothing runs yet.
    fn prepare(netns: &'lab Netns) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("lab-prometheus-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let address = netns.enter(|| Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?))?;
        Ok(Self {
            api: Api { netns, address },
            dir,
            child: None,
        })
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("prometheus.yml")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// Starts the server on the configuration at `config_path()`; returns once
    /// it is ready.
    fn start(&mut self, binary: &Path) -> anyhow::Result<()> {
        let log = File::create(self.dir.join("prometheus.log"))?;
        let mut command = self.api.netns.command(binary);
        command
            .arg(format!("--config.file={}", self.config_path().display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                self.dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={}", self.api.address))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // nsenter without --fork execs the server: the child is Prometheus itself.
        self.child = Some(command.spawn().context("cannot start prometheus")?);
        self.poll("prometheus to be ready", |api| {
            let (status, body) = api.get("/-/ready")?;
            Ok(if status == 200 {
                Ok(())
            } else {
                Err(format!("{status} {body}"))
            })
        })
    }

    /// Fails if the server has exited.
    fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(child) = &mut self.child
            && let Some(status) = child.try_wait()?
        {
            bail!("prometheus exited ({status}); its log:\n{}", self.log());
        }
        Ok(())
    }

    /// Polls `check` every 100 ms until it yields `Ok(value)`, failing after
    /// [`DEADLINE`] with `what` and the last `Err(observation)` or error, or
    /// at once if the server exits.
    fn poll<T>(
        &mut self,
        what: &str,
        mut check: impl FnMut(Api<'lab>) -> anyhow::Result<Result<T, String>>,
    ) -> anyhow::Result<T> {
        let start = Instant::now();
        loop {
            self.ensure_running()?;
            let last = match check(self.api) {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(observed)) => observed,
                // The server may not listen yet.
                Err(error) => format!("{error:#}"),
            };
            if start.elapsed() > DEADLINE {
                bail!("timed out after {DEADLINE:?} waiting for {what}; last seen: {last}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Polls until `promql` returns exactly one sample whose value satisfies
    /// `ok`; that sample.
    fn wait_one(&mut self, promql: &str, ok: impl Fn(f64) -> bool) -> anyhow::Result<Sample> {
        self.poll(&format!("`{promql}` to hold"), |api| {
            let mut samples = api.query(promql)?;
            Ok(match samples.len() {
                1 if ok(samples[0].value) => Ok(samples.remove(0)),
                _ => Err(format!("{samples:?}")),
            })
        })
    }
}

impl Drop for Prometheus<'_> {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("prometheus' log:\n{}", self.log());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The rules Prometheus loaded: every group of alerts.yml with every rule,
/// each evaluated at least once with health "ok". An evaluation error fails
/// at once, with Prometheus' message.
fn rules_ok(
    api: Api<'_>,
    groups: &BTreeSet<String>,
    rules: &BTreeSet<String>,
) -> anyhow::Result<Result<(), String>> {
    let data = api.v1("rules")?;
    let loaded = data["groups"].as_array().context("no groups")?;
    let mut loaded_groups = BTreeSet::new();
    let mut loaded_rules = BTreeSet::new();
    let mut unevaluated = Vec::new();
    for group in loaded {
        loaded_groups.insert(group["name"].as_str().unwrap_or_default().to_owned());
        for rule in group["rules"].as_array().context("no rules")? {
            let name = rule["name"].as_str().unwrap_or_default().to_owned();
            match rule["health"].as_str() {
                Some("ok") => {}
                Some("err") => bail!(
                    "rule {name} in group {} fails: {}",
                    group["name"],
                    rule["lastError"]
                ),
                health => unevaluated.push(format!("{name}: {health:?}")),
            }
            loaded_rules.insert(name);
        }
    }
    ensure!(
        &loaded_groups == groups && &loaded_rules == rules,
        "Prometheus loaded groups {loaded_groups:?} with rules {loaded_rules:?}; \
         alerts.yml has {groups:?} with {rules:?}"
    );
    Ok(if unevaluated.is_empty() {
        Ok(())
    } else {
        Err(format!("not evaluated yet: {unevaluated:?}"))
    })
}

/// The pending or firing alerts, as `name (state)`.
fn active_alerts(api: Api<'_>) -> anyhow::Result<Vec<String>> {
    let data = api.v1("alerts")?;
    Ok(data["alerts"]
        .as_array()
        .context("no alerts")?
        .iter()
        .map(|alert| format!("{} ({})", alert["labels"]["alertname"], alert["state"]))
        .collect())
}

#[test]
fn prometheus_scrapes_the_daemons_and_evaluates_the_alerts_with_the_shipped_configuration() {
    if !tests::privileged() {
        return;
    }
    let (Some(prometheus_binary), Some(promtool)) = (
        required_tool("prometheus", TEST),
        required_tool("promtool", TEST),
    ) else {
        return;
    };
    let started = Instant::now();
    let phase = |what: &str| eprintln!("{TEST}: {what} after {:.1?}", started.elapsed());

    let mut lab = Lab::new().unwrap();
    let socket = lab
        .start_xdp_agent(&["--xdp-mode", "native", "--metrics", AGENT_METRICS])
        .unwrap();
    lab.start_turn_control(Some(&socket), &[]).unwrap();
    phase("daemons started");

    // The shipped configuration, made to run here, passes promtool.
    let shipped = shipped_dir();
    let targets = BTreeMap::from([
        ("turn-control", TURN_CONTROL_METRICS),
        ("xdp-agent", AGENT_METRICS),
    ]);
    let (config, jobs) = lab_config(
        &fs::read_to_string(shipped.join("prometheus.yml")).unwrap(),
        &shipped,
        &targets,
    )
    .unwrap();
    assert_eq!(
        jobs.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        targets.keys().copied().collect(),
        "the shipped jobs are not the lab's daemons"
    );
    let mut prometheus = Prometheus::prepare(&lab.relay).unwrap();
    fs::write(prometheus.config_path(), &config).unwrap();
    let check = Command::new(&promtool)
        .arg("check")
        .arg("config")
        .arg(prometheus.config_path())
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "promtool check config on\n{config}\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    prometheus.start(&prometheus_binary).unwrap();
    phase("prometheus ready");

    // Every job is up, its instance the host without the port (the shipped
    // relabelling), so that both daemons of a host share it.
    for job in &jobs {
        let up = prometheus
            .wait_one(&format!("up{{job=\"{job}\"}}"), |v| v == 1.0)
            .unwrap();
        let host = targets[job.as_str()].rsplit_once(':').unwrap().0;
        assert_eq!(up.label("instance"), host, "{job}: {up:?}");
    }
    phase("every job up");

    // turn-control's series.
    prometheus
        .wait_one("turn_agent_connected{job=\"turn-control\"}", |v| v == 1.0)
        .unwrap();
    let threads = prometheus.wait_one("turn_threads", |v| v >= 1.0).unwrap();
    assert_eq!(threads.label("job"), "turn-control");
    prometheus
        .wait_one("turn_allocations_active", |v| v == 0.0)
        .unwrap();

    // The agent's series.
    let capacity = prometheus
        .wait_one("xdp_binding_map_capacity", |v| v >= 1.0)
        .unwrap();
    assert_eq!(capacity.label("job"), "xdp-agent");
    let attached = prometheus
        .wait_one(
            &format!("xdp_attached{{interface=\"{RELAY_IFACE}\"}}"),
            |v| v == 1.0,
        )
        .unwrap();
    assert_eq!(attached.label("mode"), "native", "{attached:?}");
    prometheus
        .wait_one("xdp_bindings_installed", |v| v == 0.0)
        .unwrap();
    prometheus
        .wait_one("xdp_agent_uptime_seconds", |v| v > 0.0)
        .unwrap();

    // The alert rules: all loaded and evaluated without errors.
    let (groups, rules) = rule_names(&fs::read_to_string(shipped.join("alerts.yml")).unwrap());
    prometheus
        .poll("every rule of alerts.yml to be evaluated", |api| {
            rules_ok(api, &groups, &rules)
        })
        .unwrap();
    // The recording rule the quota alert divides by.
    prometheus
        .wait_one("turn:allocations_total_quota:configured", |v| v >= 1.0)
        .unwrap();
    // The matchings of the alerts over both daemons find the real series: the
    // fill ratio of XdpBindingMapNearFull has one sample per map, and
    // XdpNotAttached's `unless on (instance)` pairs the agent's `up` with its
    // `xdp_attached`.
    let ratio = "xdp_binding_map_entries / ignoring (map) group_left () xdp_binding_map_capacity";
    let maps = prometheus.api.query("xdp_binding_map_entries").unwrap();
    let ratios = prometheus.api.query(ratio).unwrap();
    assert!(!maps.is_empty(), "no xdp_binding_map_entries");
    assert_eq!(ratios.len(), maps.len(), "{ratio}: {ratios:?}");
    assert!(ratios.iter().all(|s| s.value == 0.0), "{ratios:?}");
    let attached_up = "up{job=\"xdp-agent\"} == 1 and on (instance) xdp_attached == 1";
    assert_eq!(
        prometheus.api.query(attached_up).unwrap().len(),
        1,
        "{attached_up}"
    );
    // Nothing fires, or waits to, on a healthy relay (a turn_agent_connected of 0
    // scraped before the link came up may leave a pending alert for a moment).
    prometheus
        .poll("no pending or firing alert", |api| {
            let active = active_alerts(api)?;
            Ok(if active.is_empty() {
                Ok(())
            } else {
                Err(format!("{active:?}"))
            })
        })
        .unwrap();
    phase("rules evaluated, no alert");

    // A TURN client binds a channel to the peer: the binding appears in both
    // daemons' series, then channel data is relayed in the kernel and its
    // bytes reach Prometheus.
    let runtime = tests::clients::runtime().unwrap();
    let _guard = runtime.enter();
    let peer = tests::clients::udp_socket(&lab.peer, IpAddr::V4(PEER_V4)).unwrap();
    let server = SocketAddr::new(IpAddr::V4(Site::A.v4()), 3478);
    let client = runtime
        .block_on(tests::clients::webrtc_client(
            &lab.client,
            IpAddr::V4(CLIENT_V4),
            server,
        ))
        .unwrap();
    let relayed = runtime.block_on(client.allocate()).unwrap();
    runtime
        .block_on(tests::clients::round_trips(&relayed, &peer, 3, T))
        .unwrap();
    prometheus
        .wait_one("turn_channel_bindings_active", |v| v == 1.0)
        .unwrap();
    prometheus
        .wait_one("xdp_bindings_installed", |v| v == 1.0)
        .unwrap();
    prometheus
        .wait_one(
            "sum(turn_offload_installs_total{result=\"installed\"})",
            |v| v >= 1.0,
        )
        .unwrap();
    runtime
        .block_on(tests::clients::round_trips(&relayed, &peer, 20, T))
        .unwrap();
    // 20 round trips of at least 13 bytes, over the channel in place.
    let relayed_bytes = prometheus
        .wait_one("data_relayed_ebpf_bytes_total", |v| v >= 260.0)
        .unwrap();
    assert_eq!(relayed_bytes.label("job"), "xdp-agent");
    let ratios = prometheus.api.query(ratio).unwrap();
    assert!(ratios.iter().any(|s| s.value > 0.0), "{ratio}: {ratios:?}");
    assert!(
        ratios.iter().all(|s| s.value < 0.9),
        "one binding fills a map: {ratios:?}"
    );
    assert!(
        active_alerts(prometheus.api).unwrap().is_empty(),
        "alerts after the traffic: {:?}",
        active_alerts(prometheus.api)
    );
    phase("traffic seen");

    let _ = runtime.block_on(client.close());
}
