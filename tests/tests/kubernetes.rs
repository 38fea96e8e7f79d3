//! The Kubernetes manifests under `deploy/kubernetes` and `deploy/Containerfile`:
//! - the base and the example overlay render with `kubectl kustomize` (offline);
//! - the rendered overlay passes `kubernetes-validate --strict` against the schemas of
//!   Kubernetes 1.32 (the PodMonitors have no built-in schema: their required fields are
//!   checked here, and their ports against the DaemonSet's);
//! - the DaemonSet keeps the properties the design relies on (host network, the agent's
//!   capabilities equal to its systemd unit's, the host's bpffs, the shared socket
//!   directory, probes on the daemons' health ports, a grace period covering the drain);
//! - each container's arguments, with the ConfigMap's TOML as `--config` and the
//!   container's environment, pass the workspace binary's `--print-config`, and the
//!   preStop hook's `turn-control drain` arguments parse;
//! - the Containerfile has its two stages and installs what the manifests run.
//!
//! Not checked here (it needs a cluster or a container engine): scheduling, the probes
//! against running daemons, the capabilities under a real runtime, the drain under
//! traffic, the image build. A missing tool (kubectl, kubernetes-validate from
//! `tests/setup.sh`) fails a test under `CI=true` and prints a loud SKIPPED line otherwise.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test: failures should panic"
)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use serde_json::Value;
use tests::files::{TempDir, deploy, read, repo, run};
use tests::{required_tool, workspace_binary};

/// The Kubernetes release whose schemas the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.32.0";
/// Where the rendered DaemonSet's containers find the binaries (deploy/Containerfile).
const IMAGE_BIN: &str = "/usr/local/bin/";
/// A stand-in for the node's address (the downward API's `status.podIP`).
const NODE_IP: &str = "192.0.2.10";

/// `kubernetes-validate`: `$KUBERNETES_VALIDATE`, the venv `tests/setup.sh` installs, or
/// one on `PATH`.
fn kubernetes_validate(test: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("KUBERNETES_VALIDATE") {
        return Some(PathBuf::from(path));
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")));
    if let Some(cache) = cache {
        let path = cache.join("xdp-turn/kubernetes-validate/bin/kubernetes-validate");
        if path.is_file() {
            return Some(path);
        }
    }
    required_tool("kubernetes-validate", test)
}

/// `kubectl kustomize` of `dir` (under deploy/kubernetes): the YAML text.
fn kustomize(kubectl: &Path, dir: &str) -> anyhow::Result<String> {
    let output = run(Command::new(kubectl)
        .arg("kustomize")
        .arg(deploy("kubernetes").join(dir)))?;
    Ok(String::from_utf8(output.stdout)?)
}

/// The documents of a YAML stream as JSON, converted by the Python beside
/// `kubernetes-validate` (which depends on PyYAML): the workspace has no YAML crate.
fn yaml_documents(validate: &Path, yaml: &str) -> anyhow::Result<Vec<Value>> {
    let python = validate.with_file_name("python3");
    let python = if python.is_file() {
        python
    } else {
        PathBuf::from("python3")
    };
    let dir = TempDir::new("yaml");
    let file = dir.0.join("rendered.yaml");
    fs::write(&file, yaml)?;
    let output = run(Command::new(python)
        .arg("-c")
        .arg(
            "import json, sys, yaml\n\
         docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
         json.dump(docs, sys.stdout)",
        )
        .arg(&file))?;
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// The example overlay, rendered and parsed; `None` after a SKIPPED line.
fn rendered(test: &str) -> Option<Vec<Value>> {
    let kubectl = required_tool("kubectl", test)?;
    let validate = kubernetes_validate(test)?;
    let yaml = kustomize(&kubectl, "overlays/example").unwrap();
    Some(yaml_documents(&validate, &yaml).unwrap())
}

fn kind<'a>(documents: &'a [Value], kind: &str) -> Vec<&'a Value> {
    documents.iter().filter(|doc| doc["kind"] == kind).collect()
}

fn the<'a>(documents: &'a [Value], wanted: &str) -> &'a Value {
    let found = kind(documents, wanted);
    assert_eq!(
        found.len(),
        1,
        "expected one {wanted}, found {}",
        found.len()
    );
    found[0]
}

fn str_list(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|items| items.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The pod spec's containers, the native sidecars (init containers) included, by name.
fn containers(daemonset: &Value) -> BTreeMap<String, &Value> {
    let spec = &daemonset["spec"]["template"]["spec"];
    ["initContainers", "containers"]
        .iter()
        .filter_map(|list| spec[list].as_array())
        .flatten()
        .map(|container| (container["name"].as_str().unwrap().to_owned(), container))
        .collect()
}

/// The value following `flag` in `args`.
fn flag<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|arg| *arg == flag)
        .and_then(|at| args.get(at + 1).copied())
}

/// The port of an `ADDR:PORT`.
fn port_of(address: &str) -> u64 {
    address.rsplit(':').next().unwrap().parse().unwrap()
}

/// The ConfigMap's TOML mounted at `--config`.
fn turn_control_toml(documents: &[Value]) -> String {
    let config_map = the(documents, "ConfigMap");
    config_map["data"]["turn-control.toml"]
        .as_str()
        .expect("the ConfigMap has no turn-control.toml")
        .to_owned()
}

#[test]
fn manifests_render_and_validate() -> anyhow::Result<()> {
    let test = "manifests_render_and_validate";
    let Some(kubectl) = required_tool("kubectl", test) else {
        return Ok(());
    };
    let Some(validate) = kubernetes_validate(test) else {
        return Ok(());
    };
    kustomize(&kubectl, "base")?;
    let yaml = kustomize(&kubectl, "overlays/example")?;
    let documents = yaml_documents(&validate, &yaml)?;
    let mut kinds: Vec<&str> = documents
        .iter()
        .map(|doc| doc["kind"].as_str().unwrap())
        .collect();
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        [
            "ConfigMap",
            "DaemonSet",
            "Namespace",
            "PodMonitor",
            "PodMonitor",
            "Secret"
        ]
    );

    let dir = TempDir::new("validate");
    let check = |yaml: &str| -> anyhow::Result<String> {
        let file = dir.0.join("rendered.yaml");
        fs::write(&file, yaml)?;
        let output = run(Command::new(&validate)
            .args(["--kubernetes-version", KUBERNETES_VERSION, "--strict"])
            .arg(&file))?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    };
    let report = check(&yaml)?;
    // Every built-in kind passed; only the PodMonitors (a CRD) have no schema.
    for kind in ["namespace", "configmap", "secret", "daemonset"] {
        assert!(
            report
                .lines()
                .any(|line| line.contains(&format!("passed for resource {kind}/"))),
            "{kind} not validated:\n{report}"
        );
    }
    for line in report.lines().filter(|line| !line.starts_with("INFO")) {
        assert!(
            line.contains("Couldn't find schema for kind PodMonitor"),
            "kubernetes-validate: {line}"
        );
    }

    // The check is not vacuous: a misspelt field fails strict validation.
    let broken = yaml.replacen("hostNetwork: true", "hostNetwrok: true", 1);
    assert_ne!(broken, yaml);
    assert!(
        check(&broken).is_err(),
        "a misspelt field passed validation"
    );
    Ok(())
}

#[test]
fn daemonset_keeps_the_designed_properties() {
    let Some(documents) = rendered("daemonset_keeps_the_designed_properties") else {
        return;
    };
    let daemonset = the(&documents, "DaemonSet");
    let spec = &daemonset["spec"];
    assert_eq!(spec["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(spec["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 1);
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert!(
        !pod["nodeSelector"].is_null() && !pod["tolerations"].is_null(),
        "the example overlay places the relays"
    );

    // The grace period covers turn-control's drain.
    let toml = turn_control_toml(&documents);
    let deadline: u64 = toml
        .lines()
        .find_map(|line| line.strip_prefix("drain_deadline"))
        .and_then(|rest| rest.trim().strip_prefix('='))
        .map(|value| value.trim().parse().unwrap())
        .expect("turn-control.toml sets no drain_deadline");
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace >= deadline,
        "grace {grace} s < drain_deadline {deadline} s"
    );

    let volumes: BTreeMap<&str, &Value> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|volume| (volume["name"].as_str().unwrap(), volume))
        .collect();
    let mount = |container: &Value, path: &str| -> Option<String> {
        container["volumeMounts"]
            .as_array()?
            .iter()
            .find(|mount| mount["mountPath"] == path)
            .map(|mount| mount["name"].as_str().unwrap().to_owned())
    };
    let containers = containers(daemonset);
    let agent = containers["xdp-agent"];
    let control = containers["turn-control"];

    // The agent: root, not privileged, exactly the systemd unit's capabilities.
    let unit = read(&deploy("systemd/xdp-agent.service"));
    let unit_caps: Vec<String> = unit
        .lines()
        .find_map(|line| line.strip_prefix("AmbientCapabilities="))
        .unwrap()
        .split_whitespace()
        .map(|cap| cap.strip_prefix("CAP_").unwrap().to_owned())
        .collect();
    let security = &agent["securityContext"];
    assert_eq!(security["runAsUser"], 0);
    assert_ne!(security["privileged"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(str_list(&security["capabilities"]["drop"]), ["ALL"]);
    let mut added = str_list(&security["capabilities"]["add"]);
    added.sort_unstable();
    let mut wanted: Vec<&str> = unit_caps.iter().map(String::as_str).collect();
    wanted.sort_unstable();
    assert_eq!(
        added, wanted,
        "the agent's capabilities differ from its unit's"
    );
    // A native sidecar: it outlives turn-control's drain.
    assert_eq!(agent["restartPolicy"], "Always");

    let bpffs = mount(agent, "/sys/fs/bpf").expect("no bpffs in the agent");
    assert_eq!(volumes[bpffs.as_str()]["hostPath"]["path"], "/sys/fs/bpf");
    assert_eq!(volumes[bpffs.as_str()]["hostPath"]["type"], "Directory");
    let run_agent = mount(agent, "/run/xdp-turn").expect("no socket directory in the agent");
    let run_control = mount(control, "/run/xdp-turn").expect("no socket directory in turn-control");
    assert_eq!(run_agent, run_control);
    assert!(volumes[run_agent.as_str()]["emptyDir"].is_object());

    // The socket: the agent serves turn-control's uid.
    let agent_args = str_list(&agent["args"]);
    let control_args = str_list(&control["args"]);
    assert_eq!(
        flag(&agent_args, "--grpc"),
        flag(&control_args, "--agent"),
        "the daemons disagree on the socket"
    );
    assert!(agent_args.contains(&"--persist"));
    let control_security = &control["securityContext"];
    assert_eq!(control_security["runAsNonRoot"], true);
    assert_eq!(control_security["readOnlyRootFilesystem"], true);
    assert_eq!(str_list(&control_security["capabilities"]["drop"]), ["ALL"]);
    assert!(control_security["capabilities"]["add"].is_null());
    let uid = control_security["runAsUser"].as_u64().unwrap().to_string();
    assert_eq!(flag(&agent_args, "--grpc-user"), Some(uid.as_str()));

    // The probes target the daemons' health listeners, which the kubelet reaches in the
    // node's network namespace (hostNetwork) on loopback.
    for (container, address, args) in [
        (agent, "--health", &agent_args),
        (control, "--admin", &control_args),
    ] {
        let listener = flag(args, address).unwrap_or_else(|| panic!("no {address}"));
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &container[probe]["httpGet"];
            assert_eq!(get["path"], path, "{address}: {probe}");
            assert_eq!(get["port"].as_u64(), Some(port_of(listener)), "{probe}");
            let host = get["host"].as_str().unwrap_or("the node's address");
            assert!(
                listener.starts_with(host) || listener.starts_with("0.0.0.0"),
                "{probe} on {host}, listener on {listener}"
            );
        }
    }

    // preStop drains turn-control through its admin endpoint.
    let pre_stop = str_list(&control["lifecycle"]["preStop"]["exec"]["command"]);
    assert_eq!(
        pre_stop[..2],
        [&format!("{IMAGE_BIN}turn-control"), "drain"]
    );
    assert_eq!(flag(&pre_stop, "--admin"), flag(&control_args, "--admin"));
    assert!(pre_stop.contains(&"--wait"));

    // Config and secret come from the ConfigMap and the Secret that were rendered.
    let config = mount(control, "/etc/xdp-turn").unwrap();
    let config_map = the(&documents, "ConfigMap");
    assert_eq!(
        volumes[config.as_str()]["configMap"]["name"],
        config_map["metadata"]["name"]
    );
    let secret = control["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|env| env["name"] == "TURN_CONTROL_AUTH_SECRET")
        .expect("no TURN_CONTROL_AUTH_SECRET");
    let secret_ref = &secret["valueFrom"]["secretKeyRef"];
    let secret_doc = the(&documents, "Secret");
    assert_eq!(secret_ref["name"], secret_doc["metadata"]["name"]);
    assert!(!secret_doc["data"][secret_ref["key"].as_str().unwrap()].is_null());
}

#[test]
fn podmonitors_scrape_both_daemons() {
    let Some(documents) = rendered("podmonitors_scrape_both_daemons") else {
        return;
    };
    let daemonset = the(&documents, "DaemonSet");
    let labels = daemonset["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .unwrap();
    // Named container ports and the port each daemon's --metrics listens on.
    let mut ports = BTreeMap::new();
    for container in containers(daemonset).values() {
        let args = str_list(&container["args"]);
        let metrics = port_of(flag(&args, "--metrics").expect("a daemon without --metrics"));
        for port in container["ports"].as_array().into_iter().flatten() {
            let number = port["containerPort"].as_u64().unwrap();
            if number == metrics {
                ports.insert(port["name"].as_str().unwrap().to_owned(), number);
            }
        }
    }
    assert_eq!(ports.len(), 2, "metrics ports: {ports:?}");

    let monitors = kind(&documents, "PodMonitor");
    let mut scraped = Vec::new();
    for monitor in monitors {
        // The CRD's required fields (no schema for kubernetes-validate).
        assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
        let name = monitor["metadata"]["name"].as_str().unwrap();
        let spec = &monitor["spec"];
        let selector = spec["selector"]["matchLabels"]
            .as_object()
            .unwrap_or_else(|| panic!("{name}: no spec.selector.matchLabels"));
        for (key, value) in selector {
            assert_eq!(labels.get(key), Some(value), "{name} selects no relay pod");
        }
        if let Some(namespaces) = spec["namespaceSelector"]["matchNames"].as_array() {
            assert!(namespaces.contains(&daemonset["metadata"]["namespace"]));
        }
        for endpoint in spec["podMetricsEndpoints"].as_array().unwrap() {
            let port = endpoint["port"].as_str().unwrap();
            assert!(
                ports.contains_key(port),
                "{name}: port {port} is not a metrics port"
            );
            assert!(matches!(endpoint["path"].as_str(), None | Some("/metrics")));
            scraped.push(port.to_owned());
        }
    }
    scraped.sort();
    assert_eq!(scraped, ports.into_keys().collect::<Vec<_>>());
}

/// `$(NAME)` in `arg` replaced from `env` (Kubernetes' dependent environment variables).
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    env.iter().fold(arg.to_owned(), |arg, (name, value)| {
        arg.replace(&format!("$({name})"), value)
    })
}

/// A container's environment, with stand-ins for the downward API and the secret.
fn container_env(container: &Value) -> BTreeMap<String, String> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|env| {
            let name = env["name"].as_str().unwrap().to_owned();
            let from = &env["valueFrom"];
            let value = if let Some(value) = env["value"].as_str() {
                value.to_owned()
            } else if from["fieldRef"]["fieldPath"] == "status.podIP" {
                NODE_IP.to_owned()
            } else if from["secretKeyRef"].is_object() {
                "dummy-secret".to_owned()
            } else {
                panic!("{name}: an environment source this test does not know: {env}")
            };
            (name, value)
        })
        .collect()
}

#[test]
fn container_flags_are_accepted() -> anyhow::Result<()> {
    let Some(documents) = rendered("container_flags_are_accepted") else {
        return Ok(());
    };
    let daemonset = the(&documents, "DaemonSet");
    let dir = TempDir::new("flags");
    let config = dir.0.join("turn-control.toml");
    fs::write(&config, turn_control_toml(&documents))?;
    let containers = containers(daemonset);
    assert_eq!(
        containers.keys().collect::<Vec<_>>(),
        ["turn-control", "xdp-agent"]
    );

    for (name, container) in &containers {
        let command = str_list(&container["command"]);
        assert_eq!(command, [format!("{IMAGE_BIN}{name}")], "{name}: command");
        let env = container_env(container);
        let mut args: Vec<String> = str_list(&container["args"])
            .into_iter()
            .map(|arg| expand(arg, &env))
            .collect();
        assert!(
            !args.iter().any(|arg| arg.contains("$(")),
            "{name}: an unset variable in {args:?}"
        );
        if let Some(at) = args.iter().position(|arg| arg == "--config") {
            args[at + 1] = config.to_string_lossy().into_owned();
        }
        let binary = workspace_binary(name)?;
        let mut command = Command::new(&binary);
        command.args(&args).arg("--print-config");
        // Only the manifest's environment: none of the caller's daemon variables.
        for (variable, _) in std::env::vars() {
            if variable.starts_with("TURN_CONTROL_") || variable.starts_with("XDP_AGENT_") {
                command.env_remove(variable);
            }
        }
        command.envs(&env);
        let output = run(&mut command).with_context(|| format!("{name}'s manifest flags"))?;
        let printed = String::from_utf8_lossy(&output.stdout);
        if *name == "turn-control" {
            assert!(
                printed.contains(&format!("relay_ip = [\"{NODE_IP}\"]")),
                "{printed}"
            );
            assert!(
                printed.contains("auth_secret = \"<redacted>\""),
                "{printed}"
            );
        }
    }

    // The preStop hook's arguments parse (`--help` after them: clap rejects unknown
    // flags and bad values first).
    let control = containers["turn-control"];
    let pre_stop = str_list(&control["lifecycle"]["preStop"]["exec"]["command"]);
    run(Command::new(workspace_binary("turn-control")?)
        .args(&pre_stop[1..])
        .arg("--help"))
    .context("the preStop hook's `turn-control drain`")?;
    Ok(())
}

#[test]
fn containerfile_builds_what_the_manifests_run() {
    let file = read(&deploy("Containerfile"));
    let stages: Vec<&str> = file
        .lines()
        .filter(|line| line.starts_with("FROM "))
        .collect();
    assert_eq!(stages.len(), 2, "{stages:?}");
    assert!(stages[0].ends_with(" AS build") && stages[0].contains("rust:"));
    assert!(stages[1].ends_with(" AS runtime") && stages[1].contains("debian:"));
    let (build, runtime) = file.split_once(stages[1]).unwrap();

    // The builder has the BPF toolchain of tests/setup.sh, at the same bpf-linker.
    let setup = read(&repo().join("tests/setup.sh"));
    let version = setup
        .lines()
        .find_map(|line| line.strip_prefix("BPF_LINKER_VERSION="))
        .unwrap();
    assert!(build.contains(&format!("ARG BPF_LINKER_VERSION={version}")));
    for needle in [
        "--component rust-src",
        "bpf-linker@",
        "libelf-dev",
        "protobuf-compiler",
        "cargo build --release --locked -p turn-control -p xdp-agent",
    ] {
        assert!(build.contains(needle), "the build stage lacks {needle}");
    }

    // The runtime: libbpf's libraries, both daemons in /usr/local/bin, uid 65532.
    for needle in [
        "libelf1",
        "zlib1g",
        "--uid 65532",
        "USER 65532:65532",
        "/out/turn-control /out/xdp-agent",
    ] {
        assert!(runtime.contains(needle), "the runtime stage lacks {needle}");
    }
    let copy = runtime
        .lines()
        .find(|line| line.starts_with("COPY --from=build"))
        .unwrap();
    assert!(copy.ends_with(&format!(" {IMAGE_BIN}")), "{copy}");
    // Build outputs stay out of the context.
    let ignore = read(&deploy("Containerfile.dockerignore"));
    assert!(ignore.lines().any(|line| line == "target"));
}
