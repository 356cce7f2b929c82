//! Offline checks of deploy/: the alert rules load in promtool, the
//! PrometheusRule carries exactly those rules, the manifests hold together
//! (what the DaemonSet mounts exists, the port the PodMonitor scrapes is the
//! one ctrace serves, the capabilities are the ones it needs), the
//! dashboard is well-formed, the OpenWrt service script parses. The
//! dashboard's queries are run against a real Prometheus in the e2e
//! exporter test.
use std::{path::PathBuf, process::Command};

fn deploy(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(rel)
}

fn tool(path: &str, test: &str) -> bool {
    let there = std::path::Path::new(path).exists();
    if !there {
        eprintln!("SKIPPED {test}: {path} not installed (`cargo xtask test` installs it)");
    }
    there
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_pass_promtool() {
    if !tool("/usr/bin/promtool", "alert_rules_pass_promtool") {
        return;
    }
    let out = run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(deploy("prometheus/ctrace-rules.yml")));
    assert!(out.contains("SUCCESS: 5 rules found"), "{out}");
}

/// The manifests' structure, checked by PyYAML (no cluster needed).
const MANIFEST_CHECKS: &str = r#"
import sys, yaml, json, re
d = sys.argv[1]
docs = {}
kust = yaml.safe_load(open(f"{d}/kubernetes/kustomization.yaml"))
for f in kust["resources"]:
    for doc in yaml.safe_load_all(open(f"{d}/kubernetes/{f}")):
        for key in ["apiVersion", "kind", "metadata"]:
            assert key in doc, f"{f}: no {key}"
        assert doc["metadata"].get("name"), f"{f}: unnamed {doc['kind']}"
        docs[doc["kind"]] = doc

assert sorted(kust["resources"]) == ["daemonset.yaml", "podmonitor.yaml", "prometheusrule.yaml"], kust
(gen,) = kust["configMapGenerator"]
assert gen["files"] == ["grafana-dashboard.json"], gen
assert gen["options"]["labels"] == {"grafana_dashboard": "1"}, gen
ns = docs["Namespace"]
assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged", ns
for kind in ["PodMonitor", "PrometheusRule"]:
    assert docs[kind]["metadata"]["labels"].get("release"), f"{kind}: no release label for kube-prometheus-stack"

ds = docs["DaemonSet"]
spec = ds["spec"]["template"]["spec"]
assert spec["hostNetwork"] is True and spec["hostPID"] is True
assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
(c,) = spec["containers"]
sc = c["securityContext"]
assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
assert spec["automountServiceAccountToken"] is False
assert sc["capabilities"]["drop"] == ["ALL"]
allowed = {"BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE", "SYS_RESOURCE"}
assert set(sc["capabilities"]["add"]) <= allowed, sc["capabilities"]["add"]
assert {"BPF", "PERFMON", "NET_ADMIN"} <= set(sc["capabilities"]["add"])
volumes = {v["name"] for v in spec["volumes"]}
for m in c["volumeMounts"]:
    assert m["name"] in volumes, f"mount of missing volume {m['name']}"
# Writable paths exist as volumes: the recording.
record = [a.split("=", 1)[1] for a in c["args"] if a.startswith("--record=")][0]
assert any(record.startswith(m["mountPath"] + "/") and not m.get("readOnly") for m in c["volumeMounts"]), record
port = int([a.rsplit(":", 1)[1] for a in c["args"] if a.startswith("--metrics=")][0])
ports = {p["name"]: p["containerPort"] for p in c["ports"]}
assert ports["metrics"] == port
assert c["livenessProbe"]["httpGet"]["port"] == "metrics", c.get("livenessProbe")
pm = docs["PodMonitor"]
assert pm["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["metrics"]

rules = yaml.safe_load(open(f"{d}/prometheus/ctrace-rules.yml"))
assert docs["PrometheusRule"]["spec"] == rules, "PrometheusRule differs from ctrace-rules.yml"

dash = json.load(open(f"{d}/kubernetes/grafana-dashboard.json"))
ids = [p["id"] for p in dash["panels"]]
assert len(ids) == len(set(ids)), "duplicate panel ids"
for p in dash["panels"]:
    assert p["targets"], p["title"]
    for t in p["targets"]:
        assert re.search(r"\bctrace_", t["expr"]), t["expr"]
        assert "node_nf_conntrack_" not in t["expr"], t["expr"]
        assert 'node=~"$node"' in t["expr"], f"{p['title']}: not filtered by node"
vars = [v["name"] for v in dash["templating"]["list"]]
assert "node" in vars, vars
print("manifests ok:", sorted(docs))
"#;

#[test]
fn manifests_and_dashboard_hold_together() {
    if !tool("/usr/bin/python3", "manifests_and_dashboard_hold_together") {
        return;
    }
    let have_yaml = Command::new("python3")
        .args(["-c", "import yaml"])
        .status()
        .is_ok_and(|s| s.success());
    if !have_yaml {
        eprintln!("SKIPPED manifests_and_dashboard_hold_together: PyYAML missing (python3-yaml)");
        return;
    }
    let out = run(Command::new("python3")
        .args(["-c", MANIFEST_CHECKS])
        .arg(deploy("")));
    assert!(out.contains("manifests ok"), "{out}");
}

#[test]
fn prometheusrule_passes_promtool() {
    if !tool("/usr/bin/promtool", "prometheusrule_passes_promtool") {
        return;
    }
    // The operator's object wraps a rules file in `spec:`; unwrap it.
    let text = std::fs::read_to_string(deploy("kubernetes/prometheusrule.yaml")).unwrap();
    let spec = text.split_once("\nspec:\n").unwrap().1;
    let rules: String = spec
        .lines()
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let path = std::env::temp_dir().join(format!("ctrace-prule-{}.yml", std::process::id()));
    std::fs::write(&path, rules).unwrap();
    let out = run(Command::new("promtool").args(["check", "rules"]).arg(&path));
    let _ = std::fs::remove_file(&path);
    assert!(out.contains("SUCCESS: 5 rules found"), "{out}");
}

/// The procd script parses, and every UCI option it reads is in the
/// shipped /etc/config/ctrace (a typo would silently read its default),
/// which is UCI: `config`, `option` and `list` lines only.
#[test]
fn openwrt_service_reads_the_options_its_config_has() {
    run(Command::new("sh")
        .arg("-n")
        .arg(deploy("openwrt/ctrace.init")));
    let config = std::fs::read_to_string(deploy("openwrt/ctrace.config")).unwrap();
    let mut sections = std::collections::BTreeMap::<String, Vec<String>>::new();
    let mut current = None;
    for line in config.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["config", _kind, name] => {
                let name = name.trim_matches('\'').to_string();
                sections.entry(name.clone()).or_default();
                current = Some(name);
            }
            ["option" | "list", key, ..] => sections
                .get_mut(current.as_ref().expect("an option before any section"))
                .unwrap()
                .push(key.to_string()),
            _ => panic!("not UCI: {line:?}"),
        }
    }
    let script = std::fs::read_to_string(deploy("openwrt/ctrace.init")).unwrap();
    let mut read = 0;
    for line in script.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        // config_get[_bool] VAR SECTION OPTION [DEFAULT]
        if let [get, _var, section, option, ..] = words.as_slice()
            && get.starts_with("config_get")
        {
            read += 1;
            let keys = sections
                .get(*section)
                .unwrap_or_else(|| panic!("section {section} not in the config"));
            assert!(
                keys.iter().any(|k| k == option),
                "{section}.{option} is read but not in the shipped config"
            );
        }
    }
    assert!(read >= 10, "only {read} options read");
    assert!(
        script.contains("config_list_foreach main service"),
        "{script}"
    );
    assert!(
        script.contains("procd_add_reload_trigger \"ctrace\""),
        "{script}"
    );
    assert!(script.contains("procd_add_interface_trigger"), "{script}");
}

/// The DaemonSet names the image `cargo xtask image` tags: `ctrace:` and
/// the workspace's version.
#[test]
fn the_daemonset_runs_the_image_the_build_tags() {
    let cargo = std::fs::read_to_string(deploy("../Cargo.toml")).unwrap();
    let version = cargo
        .lines()
        .skip_while(|l| l.trim() != "[workspace.package]")
        .find_map(|l| l.strip_prefix("version = \"")?.strip_suffix('"'))
        .unwrap();
    let ds = std::fs::read_to_string(deploy("kubernetes/daemonset.yaml")).unwrap();
    let images: Vec<&str> = ds
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image: "))
        .collect();
    assert_eq!(images, [format!("ctrace:{version}")], "{images:?}");
}

/// OpenWrt's shell library, as far as the init script uses it: UCI values
/// come from `CFG_<section>_<option>` (set or not, as UCI tells an empty
/// option from a missing one), addresses of logical networks from
/// `NET_<network>`, and procd prints the command it would run.
const OPENWRT_STUBS: &str = r#"
config_load() { [ "$1" = ctrace ]; }
config_get() {
	eval "if [ \"\${CFG_$2_$3+set}\" = set ]; then $1=\"\$CFG_$2_$3\"; else $1=\"\$4\"; fi"
}
config_get_bool() {
	config_get "$@"
	eval "case \"\$$1\" in 1|on|true|yes|enabled) $1=1 ;; *) $1=0 ;; esac"
}
config_list_foreach() { eval "for x in \$CFG_$1_$2; do \"$3\" \"\$x\"; done"; }
network_get_ipaddr() { eval "[ -n \"\${NET_$2-}\" ] && $1=\"\$NET_$2\""; }
procd_open_instance() { CMD=; }
procd_set_param() { if [ "$1" = command ]; then shift; CMD="$*"; fi; }
procd_append_param() { if [ "$1" = command ]; then shift; CMD="$CMD $*"; fi; }
procd_close_instance() { echo "procd: $CMD"; }
logger() { echo "logger: $*"; }
"#;

/// Runs the init script's start_service on the shipped UCI config, with
/// `changes` (`section_option=value`, `-section_option` to unset) and the
/// lan network's address, and returns what procd and the log were told.
fn openwrt_start(changes: &[&str], lan: Option<&str>) -> String {
    let script = std::fs::read_to_string(deploy("openwrt/ctrace.init")).unwrap();
    // OpenWrt's library is stubbed above; the script's own lines stay.
    let script = script.replace(". /lib/functions/network.sh", ":");
    let config = std::fs::read_to_string(deploy("openwrt/ctrace.config")).unwrap();
    let mut values = std::collections::BTreeMap::<String, String>::new();
    let mut section = String::new();
    for line in config.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["config", _, name] => section = name.trim_matches('\'').to_string(),
            ["option", key, value] => {
                values.insert(
                    format!("{section}_{key}"),
                    value.trim_matches('\'').to_string(),
                );
            }
            _ => {}
        }
    }
    for change in changes {
        match change.strip_prefix('-') {
            Some(key) => {
                values.remove(key);
            }
            None => {
                let (key, value) = change.split_once('=').unwrap();
                values.insert(key.to_string(), value.to_string());
            }
        }
    }
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("{OPENWRT_STUBS}\n{script}\nstart_service"))
        .env_clear()
        .env("PATH", "/usr/bin:/bin");
    for (key, value) in &values {
        cmd.env(format!("CFG_{key}"), value);
    }
    if let Some(addr) = lan {
        cmd.env("NET_lan", addr);
    }
    run(&mut cmd)
}

/// The command procd would run, checked by ctrace's own parser: every
/// option the script writes exists and its value parses (`--help` after
/// them is reached only when all of them do).
fn procd_command(said: &str) -> Vec<String> {
    let line = said
        .lines()
        .find_map(|l| l.strip_prefix("procd: "))
        .unwrap_or_else(|| panic!("procd was given no command:\n{said}"));
    let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
    assert_eq!(words[..2], ["/usr/sbin/ctrace", "watch"], "{line}");
    let bin = ctrace_tests::ctrace_bin();
    run(Command::new(bin).args(&words[1..]).arg("--help"));
    words
}

/// What UCI says is what ctrace is started with, and a metrics network
/// without an address is logged, never silently left out.
#[test]
fn openwrt_service_turns_uci_into_the_command_procd_runs() {
    let has = |words: &[String], seq: &[&str]| words.windows(seq.len()).any(|w| w == seq);

    let said = openwrt_start(&[], Some("192.168.1.1"));
    let words = procd_command(&said);
    let shipped: [&[&str]; 7] = [
        &["--interval", "5s"],
        &["--strategy", "auto"],
        &["--record", "/var/run/ctrace/recording.ndjson"],
        &["--record-size", "4M"],
        &["--record-keep", "2"],
        &["--metrics", "192.168.1.1:9465"],
        &["--metrics-notrack"],
    ];
    for seq in shipped {
        assert!(has(&words, seq), "{seq:?} missing: {said}");
    }

    // lan not up yet: no metrics, and the log says why.
    let said = openwrt_start(&[], None);
    let words = procd_command(&said);
    assert!(!has(&words, &["--metrics-notrack"]), "{said}");
    assert!(!words.iter().any(|w| w == "--metrics"), "{said}");
    assert!(
        said.contains(
            "logger: -t ctrace -p daemon.warn metrics: network 'lan' has no IPv4 address"
        ),
        "{said}"
    );

    // An address of one's own, no NOTRACK, no recording, two services.
    let said = openwrt_start(
        &[
            "metrics_listen_address=10.0.0.1",
            "metrics_notrack=0",
            "record_enabled=0",
            "main_service=k8s-api=tcp/6443 etcd-client=tcp/2379",
            "main_interval=2s",
        ],
        None,
    );
    let words = procd_command(&said);
    let own: [&[&str]; 4] = [
        &["--metrics", "10.0.0.1:9465"],
        &["--service", "k8s-api=tcp/6443"],
        &["--service", "etcd-client=tcp/2379"],
        &["--interval", "2s"],
    ];
    for seq in own {
        assert!(has(&words, seq), "{seq:?} missing: {said}");
    }
    assert!(!has(&words, &["--metrics-notrack"]), "{said}");
    assert!(!words.iter().any(|w| w.starts_with("--record")), "{said}");

    // Disabled: nothing started.
    let said = openwrt_start(&["main_enabled=0"], Some("192.168.1.1"));
    assert!(!said.contains("procd:"), "{said}");
}

/// Runs inside the container, as the unit `ctrace-proof.service`: starts
/// ctrace.service as shipped, reads what the service got from the
/// kernel's side (its /proc status and mount namespace), stops it, and
/// powers the container off. One `key=value` per line in /proof/result.
const HARDENING_CHECK: &str = r#"#!/bin/bash
exec >/proof/result.partial 2>&1
say() { echo "$1=$2"; }
# The package's defaults, installed as the .deb would.
mkdir -p /etc/default
cp /proof/ctrace.default /etc/default/ctrace
systemctl start ctrace.service
# Attached and serving: the metrics answer (bash's /dev/tcp: no client
# needed).
for _ in $(seq 60); do
    if exec 3<>/dev/tcp/127.0.0.1/9465 2>/dev/null; then
        printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
        grep -q '^ctrace_build_info' <&3 && { say scraped yes; break; }
        exec 3<&-
    fi
    sleep 1
done
say active "$(systemctl is-active ctrace.service)"
pid=$(systemctl show -p MainPID --value ctrace.service)
say pid "$pid"
# (Builtins only: with --volatile=yes, /etc/alternatives and so awk are
# not there.)
while read -r key value _; do
    case "$key" in
        CapBnd: | CapEff: | CapAmb: | NoNewPrivs: | Seccomp:) say "${key%:}" "$value" ;;
    esac
done </proc/"$pid"/status
in_service() { nsenter -t "$pid" -m -- "$@" 2>/dev/null; }
# ProtectSystem=strict: /usr and /etc read-only for the service.
in_service touch /etc/ctrace-hardening-probe && say etc_writable yes || say etc_writable no
in_service touch /usr/ctrace-hardening-probe && say usr_writable yes || say usr_writable no
# ProtectHome=yes: what is in /root and /home is not there for the service.
mkdir -p /root /home/someone
touch /root/ctrace-marker /home/someone/ctrace-marker
in_service test -e /root/ctrace-marker && say root_visible yes || say root_visible no
in_service test -e /home/someone/ctrace-marker && say home_visible yes || say home_visible no
# PrivateTmp=yes: the container's /tmp is not the service's.
touch /tmp/ctrace-hardening-marker
in_service test -e /tmp/ctrace-hardening-marker && say tmp_shared yes || say tmp_shared no
# RuntimeDirectory=ctrace, mode 0700: the recording's home.
say run_dir "$(stat -c %a /run/ctrace)"
say recording "$(stat -c %a /run/ctrace/recording.ndjson)"
systemctl stop ctrace.service
say result "$(systemctl show -p Result --value ctrace.service)"
say status "$(systemctl show -p ExecMainStatus --value ctrace.service)"
say uptime "$(cut -d' ' -f1 /proc/uptime)"
journalctl -u ctrace.service --no-pager -o cat | sed 's/^/journal: /'
mv /proof/result.partial /proof/result
systemctl --no-block poweroff
"#;

const HARDENING_UNIT: &str = "[Unit]
Description=checks ctrace.service's hardening
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/proof/check
";

/// The capability bits of `names` (`CAP_BPF` ...), as /proc shows them.
fn capability_mask(names: &str) -> u64 {
    names
        .split_whitespace()
        .map(|n| match n {
            "CAP_SETPCAP" => 8,
            "CAP_NET_ADMIN" => 12,
            "CAP_SYS_PTRACE" => 19,
            "CAP_SYS_ADMIN" => 21,
            "CAP_SYS_RESOURCE" => 24,
            "CAP_PERFMON" => 38,
            "CAP_BPF" => 39,
            other => panic!("capability {other} has no bit here: add it"),
        })
        .fold(0, |m, bit| m | 1 << bit)
}

/// The Debian unit's hardening, each setting proven where it takes
/// effect: systemd (PID 1 of a throwaway container booted from this
/// host's /usr with `systemd-nspawn --volatile=yes`: a tmpfs root, nothing
/// persists, the host's network and conntrack) starts ctrace.service as
/// the .deb ships it, and a unit inside reads what the running service
/// got. SystemCallFilter is proven by the service itself: it attaches,
/// serves a scrape and stops cleanly under the filter, where a refused
/// system call would have killed it.
#[test]
fn debian_service_runs_hardened_under_systemd() {
    if !ctrace_tests::privileged()
        || !tool(
            "/usr/bin/systemd-nspawn",
            "debian_service_runs_hardened_under_systemd",
        )
    {
        return;
    }
    let unit = std::fs::read_to_string(deploy("debian/ctrace.service")).unwrap();
    let bounding = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit bounds capabilities");
    // A fresh directory of root's own: mkdir fails on anything already
    // there (a link planted at this name in the world-writable /tmp too),
    // rather than following or removing it.
    let dir = std::env::temp_dir().join(format!(
        "ctrace-systemd-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
        .create(&dir)
        .unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let units = dir.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::create_dir_all(dir.join("usr/sbin")).unwrap();
    std::fs::create_dir_all(dir.join("proof")).unwrap();
    struct Gone(PathBuf);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _gone = Gone(dir.clone());
    std::fs::copy(ctrace_tests::ctrace_bin(), dir.join("usr/sbin/ctrace")).unwrap();
    let check = dir.join("proof/check");
    std::fs::write(&check, HARDENING_CHECK).unwrap();
    std::fs::set_permissions(&check, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // Where the .deb puts them, in a read-only overlay on the host's /usr.
    std::fs::copy(
        deploy("debian/ctrace.service"),
        units.join("ctrace.service"),
    )
    .unwrap();
    std::fs::write(units.join("ctrace-proof.service"), HARDENING_UNIT).unwrap();
    std::fs::copy(
        deploy("debian/ctrace.default"),
        dir.join("proof/ctrace.default"),
    )
    .unwrap();

    let d = |p: &str| dir.join(p).display().to_string();
    let mut nspawn = Command::new("systemd-nspawn");
    nspawn
        .args([
            "--quiet",
            "--register=no",
            "--keep-unit",
            "--directory=/",
            "--volatile=yes",
        ])
        // Its own network namespace: the container's systemd configures
        // nothing of the host's, and ctrace traces the container's table.
        .arg("--private-network")
        // ctrace and its unit where the package puts them.
        .arg(format!("--overlay-ro=/usr:{}:/usr", d("usr")))
        .arg(format!("--bind={}:/proof", d("proof")))
        // What a host's systemd gives a service: all capabilities, and
        // bpf(2) and perf_event_open(2), which nspawn's own filter
        // refuses containers by default.
        .args([
            "--capability=all",
            "--system-call-filter=bpf perf_event_open",
        ])
        .args(["--console=pipe", "--boot", "--"])
        .args([
            "systemd.unit=multi-user.target",
            "systemd.wants=ctrace-proof.service",
            // An empty /etc is a first boot, where presets would enable
            // every unit (ctrace.service too, and a network wait of two
            // minutes).
            "systemd.condition-first-boot=false",
        ]);
    let started = std::time::Instant::now();
    // The console goes to a file: a pipe read only at the end would fill
    // and block the container's PID 1.
    let console_log = dir.join("console.log");
    let console_file = std::fs::File::create(&console_log).unwrap();
    let mut child = nspawn
        .stdin(std::process::Stdio::null())
        .stdout(console_file.try_clone().unwrap())
        .stderr(console_file)
        .spawn()
        .expect("systemd-nspawn starts");
    let deadline = std::time::Duration::from_secs(180);
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > deadline {
            // The container's PID 1 outlives a killed nspawn: kill it
            // first, which ends everything in its PID namespace.
            let pid = child.id();
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            for c in children
                .split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok())
            {
                // SAFETY: no preconditions.
                unsafe { libc::kill(c, libc::SIGKILL) };
            }
            let _ = child.kill();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let _ = child.wait();
    let console = std::fs::read_to_string(&console_log).unwrap_or_default();
    let result = std::fs::read_to_string(dir.join("proof/result")).unwrap_or_else(|_| {
        panic!(
            "the check inside the container did not finish in {:?}:\n{console}\n{}",
            started.elapsed(),
            std::fs::read_to_string(dir.join("proof/result.partial")).unwrap_or_default()
        )
    });
    eprintln!("container ran {:.0?}:\n{result}", started.elapsed());
    let said = |key: &str| {
        result
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {key} in:\n{result}"))
            .to_string()
    };
    assert_eq!(said("scraped"), "yes", "{result}");
    assert_eq!(said("active"), "active", "{result}");
    let hex = |k: &str| u64::from_str_radix(&said(k), 16).unwrap();
    let allowed = capability_mask(bounding);
    assert_eq!(
        hex("CapBnd") & !allowed,
        0,
        "bounding set beyond the unit's: {result}"
    );
    assert_eq!(hex("CapEff") & !allowed, 0, "{result}");
    assert_eq!(hex("CapAmb"), 0, "{result}");
    assert_eq!(said("NoNewPrivs"), "1", "{result}");
    assert_eq!(
        said("Seccomp"),
        "2",
        "SystemCallFilter applies a filter: {result}"
    );
    assert_eq!(said("etc_writable"), "no", "ProtectSystem=strict: {result}");
    assert_eq!(said("usr_writable"), "no", "ProtectSystem=strict: {result}");
    assert_eq!(said("root_visible"), "no", "ProtectHome=yes: {result}");
    assert_eq!(said("home_visible"), "no", "ProtectHome=yes: {result}");
    assert_eq!(said("tmp_shared"), "no", "PrivateTmp=yes: {result}");
    assert_eq!(said("run_dir"), "700", "{result}");
    assert_eq!(said("recording"), "600", "{result}");
    assert_eq!(said("result"), "success", "stopped cleanly: {result}");
    assert_eq!(said("status"), "0", "{result}");
}
