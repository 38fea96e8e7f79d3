//! `xdp-agent-ctl` against the real agent: the bindings table and its
//! filters, JSON output of every command, and the exit statuses for a
//! missing binding (3), a binding on several listeners asked for without
//! one (4) and an unreachable agent (2).
#![expect(clippy::unwrap_used, reason = "a test: failures should panic")]

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use proto::v1::ChannelBinding;
use tests::Lab;
use tests::agent::{self, Agent, binding, binding_via, lasting};

/// Runs the CLI against the agent at `socket`.
fn ctl(socket: &Path, args: &[&str]) -> Output {
    let binary = tests::workspace_binary("xdp-agent-ctl").unwrap();
    Command::new(&binary)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("XDP_AGENT_SOCKET")
        .output()
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", binary.display()))
}

/// The standard output of a run that must succeed.
fn success(socket: &Path, args: &[&str]) -> String {
    let output = ctl(socket, args);
    assert!(
        output.status.success(),
        "xdp-agent-ctl {args:?}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The standard output of a run that must succeed, parsed as JSON.
fn json(socket: &Path, args: &[&str]) -> Json {
    let text = success(socket, args);
    Json::parse(&text).unwrap_or_else(|error| panic!("{args:?}: {error}:\n{text}"))
}

#[test]
fn cli_shows_what_the_agent_holds() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    // The default listeners, and a second one for IPv4 clients.
    let socket = lab
        .start_xdp_agent(&agent::with_lab_peers(&[
            "--xdp-mode",
            "native",
            "--listen",
            "0.0.0.0:3478,[::]:3478,203.0.113.10:443",
        ]))
        .unwrap();
    let mut agent = Agent::connect(&socket).unwrap();
    // A wildcard listener stands for the relay address of its family; `binding`
    // is on the relay's listener of the client's family, [2001:db8:2::a]:3478.
    let v4 = lasting(
        &binding_via(
            "0.0.0.0:3478".parse().unwrap(),
            "192.0.2.2:40000".parse().unwrap(),
            0x4001,
            "198.51.100.2:50000".parse().unwrap(),
            49160,
        ),
        Duration::from_secs(300),
    );
    // Of an allocation that asked for DONT-FRAGMENT.
    let v6 = ChannelBinding {
        dont_fragment: true,
        ..binding(
            "[2001:db8:1::2]:40001".parse().unwrap(),
            0x4fff,
            "198.51.100.2:50001".parse().unwrap(),
            49161,
        )
    };
    agent.install(vec![v4.clone(), v6.clone()]).unwrap();

    // The table: a header, one row per binding (IPv4 clients first), aligned
    // columns, and a count.
    let table = success(&socket, &["bindings"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "CLIENT",
            "LISTENER",
            "CHANNEL",
            "PEER",
            "PORT",
            "DF",
            "LIFETIME",
            "TO-PEER",
            "TO-CLIENT",
            "DROPPED",
            "LIMIT"
        ],
        "{table}"
    );
    let mut rows: Vec<Vec<&str>> = lines[1..3]
        .iter()
        .map(|line| line.split_whitespace().collect())
        .collect();
    // Nothing relayed yet (packets/bytes each way, dropped), no limit.
    for row in &mut rows {
        let usage = row.split_off(7);
        assert_eq!(usage, ["0/0", "0/0", "0/0", "-"], "{table}");
    }
    // What is left of each lifetime, in seconds: a little less than given.
    let lifetimes: Vec<u32> = rows
        .iter_mut()
        .map(|row| {
            let cell = row.pop().unwrap();
            cell.strip_suffix('s').unwrap().parse().unwrap()
        })
        .collect();
    assert!((290..=300).contains(&lifetimes[0]), "{table}");
    assert!((590..=600).contains(&lifetimes[1]), "{table}");
    assert_eq!(
        rows,
        [
            [
                "192.0.2.2:40000",
                "203.0.113.10:3478",
                "0x4001",
                "198.51.100.2:50000",
                "49160",
                "no"
            ],
            [
                "[2001:db8:1::2]:40001",
                "[2001:db8:2::a]:3478",
                "0x4fff",
                "198.51.100.2:50001",
                "49161",
                "yes"
            ],
        ],
        "{table}"
    );
    let column = |line: &str, cell: &str| line.find(cell).unwrap();
    for (title, cells) in [
        ("LISTENER", ["203.0.113.10:3478", "[2001:db8:2::a]:3478"]),
        ("CHANNEL", ["0x4001", "0x4fff"]),
        ("PEER", ["198.51.100.2:50000", "198.51.100.2:50001"]),
        ("DF", ["no", "yes"]),
    ] {
        let at = column(lines[0], title);
        assert_eq!(
            column(lines[1], cells[0]),
            at,
            "{title} misaligned:\n{table}"
        );
        assert_eq!(
            column(lines[2], cells[1]),
            at,
            "{title} misaligned:\n{table}"
        );
    }
    assert_eq!(lines[3], "2 bindings");

    // JSON: an array of objects with the binding's fields and its lifetime.
    let all = json(&socket, &["bindings", "--json"]);
    let all = all.array();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].field("client").string(), "192.0.2.2:40000");
    assert_eq!(all[0].field("listener").string(), "203.0.113.10:3478");
    assert_eq!(all[0].field("channel").number(), 16385.0);
    assert_eq!(all[0].field("peer").string(), "198.51.100.2:50000");
    assert_eq!(all[0].field("allocation_port").number(), 49160.0);
    assert_eq!(all[0].field("dont_fragment"), &Json::Bool(false));
    let lifetime_ms = all[0].field("lifetime_ms").number();
    assert!(
        lifetime_ms > 290_000.0 && lifetime_ms <= 300_000.0,
        "{all:?}"
    );
    assert_eq!(all[1].field("client").string(), "[2001:db8:1::2]:40001");
    assert_eq!(all[1].field("listener").string(), "[2001:db8:2::a]:3478");
    assert_eq!(all[1].field("channel").number(), 0x4fff as f64);
    assert_eq!(all[1].field("dont_fragment"), &Json::Bool(true));

    // Filters.
    let clients = |args: &[&str]| -> Vec<String> {
        let mut full = vec!["bindings", "--json"];
        full.extend_from_slice(args);
        json(&socket, &full)
            .array()
            .iter()
            .map(|b| b.field("client").string().to_owned())
            .collect()
    };
    assert_eq!(clients(&["--client", "192.0.2.2"]), ["192.0.2.2:40000"]);
    assert_eq!(
        clients(&["--client", "[2001:db8:1::2]:40001"]),
        ["[2001:db8:1::2]:40001"]
    );
    assert_eq!(clients(&["--port", "49161"]), ["[2001:db8:1::2]:40001"]);
    assert_eq!(
        clients(&["--peer", "198.51.100.2:50000"]),
        ["192.0.2.2:40000"]
    );
    assert_eq!(clients(&["--peer", "198.51.100.2"]).len(), 2);
    assert!(clients(&["--client", "192.0.2.3"]).is_empty());
    assert_eq!(
        success(&socket, &["bindings", "--client", "192.0.2.3"]),
        "0 bindings\n"
    );

    // One binding, by hex or decimal channel.
    for channel in ["0x4001", "16385"] {
        let one = json(&socket, &["binding", "192.0.2.2:40000", channel, "--json"]);
        assert_eq!(one.field("client").string(), "192.0.2.2:40000");
        assert_eq!(one.field("listener").string(), "203.0.113.10:3478");
        assert_eq!(one.field("channel").number(), 16385.0);
        assert_eq!(one.field("peer").string(), "198.51.100.2:50000");
        assert_eq!(one.field("allocation_port").number(), 49160.0);
    }
    let text = success(&socket, &["binding", "[2001:db8:1::2]:40001", "0x4fff"]);
    assert!(text.contains("198.51.100.2:50001"), "{text}");
    assert!(text.contains("0x4fff"), "{text}");
    assert!(text.contains("\nlistener "), "{text}");
    assert!(text.contains("[2001:db8:2::a]:3478"), "{text}");
    assert!(text.contains("\ndon't fragment     yes\n"), "{text}");
    assert!(text.contains("\nlifetime "), "{text}");
    // What the kernel relayed and dropped on it, and its limits: none yet.
    assert!(text.contains("\nto peer            0/0\n"), "{text}");
    assert!(text.contains("\nto client          0/0\n"), "{text}");
    assert!(text.trim_end().ends_with("rate limits        -"), "{text}");

    // The same client and channel on a second listener: listed before the
    // first (port 443 < 3478), and `binding` wants --listener (exit 4,
    // naming both).
    let other = binding_via(
        "203.0.113.10:443".parse().unwrap(),
        "192.0.2.2:40000".parse().unwrap(),
        0x4001,
        "198.51.100.2:50002".parse().unwrap(),
        49162,
    );
    agent.install(vec![other]).unwrap();
    let listed: Vec<(String, String)> = json(&socket, &["bindings", "--json"])
        .array()
        .iter()
        .map(|b| {
            (
                b.field("client").string().to_owned(),
                b.field("listener").string().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("192.0.2.2:40000", "203.0.113.10:443"),
            ("192.0.2.2:40000", "203.0.113.10:3478"),
            ("[2001:db8:1::2]:40001", "[2001:db8:2::a]:3478"),
        ]
        .map(|(c, l)| (c.to_owned(), l.to_owned()))
    );
    let output = ctl(&socket, &["binding", "192.0.2.2:40000", "0x4001"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(4), "{stderr}");
    assert!(stderr.starts_with("xdp-agent-ctl: "), "{stderr}");
    assert!(stderr.contains("203.0.113.10:443"), "{stderr}");
    assert!(stderr.contains("203.0.113.10:3478"), "{stderr}");
    assert!(stderr.contains("--listener"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    for (listener, peer) in [
        ("203.0.113.10:443", "198.51.100.2:50002"),
        ("203.0.113.10:3478", "198.51.100.2:50000"),
        // A wildcard listener is resolved by the agent.
        ("0.0.0.0:3478", "198.51.100.2:50000"),
    ] {
        let args = [
            "binding",
            "192.0.2.2:40000",
            "0x4001",
            "--listener",
            listener,
            "--json",
        ];
        let one = json(&socket, &args);
        assert_eq!(one.field("peer").string(), peer, "{listener}");
        assert_ne!(one.field("listener").string(), "0.0.0.0:3478");
    }

    // Counters, configuration and health.
    let counters = json(&socket, &["counters", "--json"]);
    let reasons = counters.field("counters").array();
    assert!(!reasons.is_empty());
    assert!(
        reasons
            .iter()
            .any(|c| c.field("reason").string() == "relay_client_to_peer_v4_v4")
    );
    for counter in reasons {
        assert!(["tx", "pass", "drop"].contains(&counter.field("verdict").string()));
        counter.field("packets").number();
        counter.field("bytes").number();
    }
    for total in [
        "relayed_packets",
        "relayed_bytes",
        "redirected_packets",
        "redirected_bytes",
        "reported_bytes",
        "lost_events",
        "expired_bindings",
    ] {
        counters.field(total).number();
    }
    let text = success(&socket, &["counters", "--all"]);
    assert!(text.contains("relay_client_to_peer_v4_v4"), "{text}");
    assert!(text.contains("lost events"), "{text}");
    assert!(text.contains("redirected packets"), "{text}");
    assert!(text.contains("redirected bytes"), "{text}");
    assert!(text.contains("expired bindings    0\n"), "{text}");

    let config = json(&socket, &["config", "--json"]);
    let listeners: Vec<&str> = config
        .field("listeners")
        .array()
        .iter()
        .map(Json::string)
        .collect();
    assert_eq!(
        listeners,
        ["0.0.0.0:3478", "[::]:3478", "203.0.113.10:443"],
        "{config:?}"
    );
    assert_eq!(config.field("next_hop").string(), "fib");
    assert!(config.field("port_min").number() <= 49160.0);
    assert!(config.field("port_max").number() >= 49162.0);
    let text = success(&socket, &["config"]);
    assert!(
        text.contains("listeners         0.0.0.0:3478, [::]:3478, 203.0.113.10:443\n"),
        "{text}"
    );
    assert!(text.contains("next hop          fib\n"), "{text}");

    let health = json(&socket, &["health", "--json"]);
    assert!(!health.field("version").string().is_empty());
    let attachments = health.field("attachments").array();
    assert_eq!(attachments.len(), 1);
    assert_eq!(
        attachments[0].field("interface").string(),
        tests::RELAY_IFACE
    );
    assert_eq!(attachments[0].field("mode").string(), "native");
    assert_eq!(health.field("installed").number(), 3.0);
    assert!(health.field("capacity").number() >= 3.0);
    health.field("uptime_seconds").number();
    health.field("generation").number();
    assert!(matches!(health.field("adopted"), Json::Bool(_)));

    // Not found: exit 3 and one line naming the binding.
    let output = ctl(&socket, &["binding", "192.0.2.2:40000", "0x4002"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert_eq!(
        stderr,
        "xdp-agent-ctl: no binding for 192.0.2.2:40000 on channel 0x4002\n"
    );

    // Unreachable: exit 2, the path and the reason.
    let output = ctl(Path::new("/nonexistent"), &["health"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with(
            "xdp-agent-ctl: cannot reach the agent at /nonexistent: No such file or directory"
        ),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    // Usage errors: exit 1.
    let output = ctl(&socket, &["binding", "192.0.2.2:40000", "0x3fff"]);
    assert_eq!(output.status.code(), Some(1));
}

/// Just enough JSON to check the CLI's output (the lab crate has no JSON
/// dependency): a strict recursive-descent parser.
#[derive(Debug, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Number(f64),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    fn parse(text: &str) -> Result<Self, String> {
        let mut parser = Parser {
            bytes: text.as_bytes(),
            at: 0,
        };
        let value = parser.value()?;
        parser.whitespace();
        if parser.at != parser.bytes.len() {
            return Err(format!("trailing bytes at {}", parser.at));
        }
        Ok(value)
    }

    fn field(&self, name: &str) -> &Json {
        let Json::Object(fields) = self else {
            panic!("not an object: {self:?}");
        };
        fields
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value)
            .unwrap_or_else(|| panic!("no field {name} in {self:?}"))
    }

    fn array(&self) -> &[Json] {
        let Json::Array(items) = self else {
            panic!("not an array: {self:?}");
        };
        items
    }

    fn string(&self) -> &str {
        let Json::String(text) = self else {
            panic!("not a string: {self:?}");
        };
        text
    }

    fn number(&self) -> f64 {
        let Json::Number(number) = self else {
            panic!("not a number: {self:?}");
        };
        *number
    }
}

struct Parser<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn whitespace(&mut self) {
        while self.bytes.get(self.at).is_some_and(u8::is_ascii_whitespace) {
            self.at += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.whitespace();
        self.bytes.get(self.at).copied()
    }

    fn expect(&mut self, byte: u8) -> Result<(), String> {
        if self.peek() == Some(byte) {
            self.at += 1;
            Ok(())
        } else {
            Err(format!("expected {:?} at {}", byte as char, self.at))
        }
    }

    fn literal(&mut self, word: &str, value: Json) -> Result<Json, String> {
        if self.bytes[self.at..].starts_with(word.as_bytes()) {
            self.at += word.len();
            Ok(value)
        } else {
            Err(format!("bad literal at {}", self.at))
        }
    }

    fn value(&mut self) -> Result<Json, String> {
        match self.peek() {
            Some(b'{') => {
                self.at += 1;
                let mut fields = Vec::new();
                if self.peek() == Some(b'}') {
                    self.at += 1;
                    return Ok(Json::Object(fields));
                }
                loop {
                    let key = self.string()?;
                    self.expect(b':')?;
                    fields.push((key, self.value()?));
                    match self.peek() {
                        Some(b',') => self.at += 1,
                        Some(b'}') => {
                            self.at += 1;
                            return Ok(Json::Object(fields));
                        }
                        _ => return Err(format!("bad object at {}", self.at)),
                    }
                }
            }
            Some(b'[') => {
                self.at += 1;
                let mut items = Vec::new();
                if self.peek() == Some(b']') {
                    self.at += 1;
                    return Ok(Json::Array(items));
                }
                loop {
                    items.push(self.value()?);
                    match self.peek() {
                        Some(b',') => self.at += 1,
                        Some(b']') => {
                            self.at += 1;
                            return Ok(Json::Array(items));
                        }
                        _ => return Err(format!("bad array at {}", self.at)),
                    }
                }
            }
            Some(b'"') => self.string().map(Json::String),
            Some(b't') => self.literal("true", Json::Bool(true)),
            Some(b'f') => self.literal("false", Json::Bool(false)),
            Some(b'n') => self.literal("null", Json::Null),
            Some(b'-' | b'0'..=b'9') => {
                let start = self.at;
                while self
                    .bytes
                    .get(self.at)
                    .is_some_and(|b| b"+-.eE0123456789".contains(b))
                {
                    self.at += 1;
                }
                let text = std::str::from_utf8(&self.bytes[start..self.at]).unwrap();
                text.parse()
                    .map(Json::Number)
                    .map_err(|_| format!("bad number {text}"))
            }
            _ => Err(format!("unexpected input at {}", self.at)),
        }
    }

    fn string(&mut self) -> Result<String, String> {
        self.expect(b'"')?;
        let mut text = Vec::new();
        loop {
            let Some(&byte) = self.bytes.get(self.at) else {
                return Err("unterminated string".to_owned());
            };
            self.at += 1;
            match byte {
                b'"' => return String::from_utf8(text).map_err(|e| e.to_string()),
                b'\\' => {
                    let escaped = self.bytes.get(self.at).copied();
                    self.at += 1;
                    match escaped {
                        Some(b'"') => text.push(b'"'),
                        Some(b'\\') => text.push(b'\\'),
                        Some(b'/') => text.push(b'/'),
                        Some(b'n') => text.push(b'\n'),
                        Some(b't') => text.push(b'\t'),
                        _ => return Err(format!("unsupported escape at {}", self.at)),
                    }
                }
                _ => text.push(byte),
            }
        }
    }
}

#[test]
fn json_parser_reads_what_serde_json_writes() {
    let value = Json::parse(
        "[\n  {\n    \"a\": \"x\\\"y\",\n    \"b\": -1.5e1,\n    \"c\": [true, false, null],\n    \"d\": {}\n  }\n]\n",
    )
    .unwrap();
    let object = &value.array()[0];
    assert_eq!(object.field("a").string(), "x\"y");
    assert_eq!(object.field("b").number(), -15.0);
    assert_eq!(
        object.field("c"),
        &Json::Array(vec![Json::Bool(true), Json::Bool(false), Json::Null])
    );
    assert_eq!(object.field("d"), &Json::Object(Vec::new()));
    for bad in ["", "[", "{\"a\" 1}", "[1,]", "\"open", "tru", "[1] x"] {
        assert!(Json::parse(bad).is_err(), "{bad}");
    }
}
