//! The service catalog: which (protocol, destination port) belongs to which
//! named service, so that a dropped SYN to :2380 reads as `etcd-peer`.
//!
//! Specs look like `NAME=PROTO/PORT[-PORT][,PROTO/PORT...]`, with PROTO one
//! of `tcp`, `udp`, `sctp` or `tcp+udp`. The same syntax serves `--service`
//! and the lines of a catalog file.
use std::{fmt, fs, path::Path, str::FromStr};

use anyhow::{Context as _, bail};

use crate::event::Proto;

/// Services every operator of a Kubernetes-ish network cares about first.
/// User entries come after these and win on overlap.
pub const DEFAULTS: &[&str] = &[
    "ssh=tcp/22",
    "etcd-client=tcp/2379",
    "etcd-peer=tcp/2380",
    "nvme-tcp=tcp/4420",
    "nvme-discovery=tcp/8009",
    "dns=tcp+udp/53",
    "kube-apiserver=tcp/6443",
    "kubelet=tcp/10250",
    "tailscale=udp/41641",
    "http=tcp/80",
    "https=tcp/443",
];

/// Where a catalog file is read from when `--services-file` is not given.
pub const DEFAULT_FILE: &str = "/etc/ctrace/services.conf";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub protos: Vec<Proto>,
    pub first: u16,
    pub last: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub ranges: Vec<PortRange>,
}

impl fmt::Display for ServiceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}=", self.name)?;
        for (i, r) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            let protos: Vec<&str> = r.protos.iter().map(|p| p.name()).collect();
            write!(f, "{}/{}", protos.join("+"), r.first)?;
            if r.last != r.first {
                write!(f, "-{}", r.last)?;
            }
        }
        Ok(())
    }
}

impl FromStr for ServiceSpec {
    type Err = anyhow::Error;

    fn from_str(spec: &str) -> anyhow::Result<Self> {
        let (name, ports) = spec
            .split_once('=')
            .with_context(|| format!("`{spec}`: expected NAME=PROTO/PORT[-PORT][,...]"))?;
        let name = name.trim();
        if name.is_empty() {
            bail!("`{spec}`: the service name is empty");
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            bail!("`{spec}`: service name `{name}` may only use letters, digits, '-', '_' and '.'");
        }
        let mut ranges = Vec::new();
        for part in ports.split(',') {
            let part = part.trim();
            let (protos, range) = part
                .split_once('/')
                .with_context(|| format!("`{spec}`: `{part}` is not PROTO/PORT"))?;
            let protos = protos
                .split('+')
                .map(|p| match p.trim().to_ascii_lowercase().as_str() {
                    "tcp" => Ok(Proto::Tcp),
                    "udp" => Ok(Proto::Udp),
                    "sctp" => Ok(Proto::Sctp),
                    other => bail!(
                        "`{spec}`: unknown protocol `{other}` (use tcp, udp, sctp or tcp+udp)"
                    ),
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let port = |s: &str| -> anyhow::Result<u16> {
                match s.trim().parse::<u16>() {
                    Ok(0) | Err(_) => bail!("`{spec}`: `{s}` is not a port number (1-65535)"),
                    Ok(p) => Ok(p),
                }
            };
            let (first, last) = match range.split_once('-') {
                Some((a, b)) => (port(a)?, port(b)?),
                None => {
                    let p = port(range)?;
                    (p, p)
                }
            };
            if first > last {
                bail!("`{spec}`: port range {first}-{last} runs backwards");
            }
            ranges.push(PortRange {
                protos,
                first,
                last,
            });
        }
        Ok(ServiceSpec {
            name: name.to_string(),
            ranges,
        })
    }
}

/// Ordered catalog; the last matching spec wins, so user entries override
/// the defaults without having to remove them.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    specs: Vec<ServiceSpec>,
}

impl Catalog {
    pub fn with_defaults() -> Self {
        let specs = DEFAULTS
            .iter()
            .map(|s| s.parse().expect("built-in service specs are valid"))
            .collect();
        Catalog { specs }
    }

    pub fn add(&mut self, spec: ServiceSpec) {
        self.specs.push(spec);
    }

    /// Reads a catalog file: one spec per line, `#` comments, blank lines
    /// ignored. Errors name the file and line.
    pub fn add_file(&mut self, path: &Path) -> anyhow::Result<()> {
        let text = fs::read_to_string(path)
            .with_context(|| format!("reading service catalog {}", path.display()))?;
        self.add_text(path, &text)
    }

    /// Adds the specs of catalog file text, as [`Catalog::add_file`] reads
    /// it; `file` is what errors call it. The specs before a bad line are
    /// kept.
    pub fn add_text(&mut self, file: &Path, text: &str) -> anyhow::Result<()> {
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let spec = line
                .parse()
                .with_context(|| format!("{}:{}", file.display(), n + 1))?;
            self.add(spec);
        }
        Ok(())
    }

    /// The service a flow to `dport` over `proto` belongs to, if any.
    pub fn lookup(&self, proto: Proto, dport: u16) -> Option<&str> {
        self.specs
            .iter()
            .rev()
            .find(|s| {
                s.ranges
                    .iter()
                    .any(|r| r.protos.contains(&proto) && (r.first..=r.last).contains(&dport))
            })
            .map(|s| s.name.as_str())
    }

    pub fn specs(&self) -> &[ServiceSpec] {
        &self.specs
    }

    /// The catalog as the kernel's totals use it: service names by index
    /// (index 0 is "no service"), and every (proto, port) a service claims
    /// with the index of the spec that wins it. Errors when the catalog
    /// claims more ports than the kernel map is allowed to hold.
    pub fn kernel_index(&self) -> anyhow::Result<KernelIndex> {
        let mut names: Vec<String> = vec![String::new()];
        let mut ports = std::collections::BTreeMap::new();
        for spec in &self.specs {
            for r in &spec.ranges {
                for proto in &r.protos {
                    for port in r.first..=r.last {
                        let key = ctrace_common::service_key(proto.number(), port);
                        if ports.contains_key(&key) {
                            continue;
                        }
                        let name = self.lookup(*proto, port).expect("the spec claims it");
                        let id = match names.iter().position(|n| n == name) {
                            Some(i) => i,
                            None => {
                                names.push(name.to_string());
                                names.len() - 1
                            }
                        };
                        ports.insert(key, id as u16);
                    }
                }
                if ports.len() > MAX_KERNEL_PORTS {
                    bail!(
                        "the service catalog claims more than {MAX_KERNEL_PORTS} (protocol, port) \
                         pairs; narrow its port ranges"
                    );
                }
            }
        }
        Ok(KernelIndex {
            names,
            ports: ports.into_iter().collect(),
        })
    }
}

/// How many (protocol, port) pairs the kernel's service map may hold: the
/// map is preallocated, ~64 bytes an entry.
pub const MAX_KERNEL_PORTS: usize = 16384;

#[derive(Clone, Debug, Default)]
pub struct KernelIndex {
    /// Index 0 is the empty name: no service.
    pub names: Vec<String>,
    pub ports: Vec<(u32, u16)>,
}

impl KernelIndex {
    /// The service index of a (protocol number, port), 0 for none: what
    /// the kernel's service map answers, for flows the tc tier leaves
    /// unnamed.
    pub fn index_of(&self, proto: u8, port: u16) -> u16 {
        let key = ctrace_common::service_key(proto, port);
        // Sorted: built from a BTreeMap.
        self.ports
            .binary_search_by_key(&key, |(k, _)| *k)
            .map_or(0, |i| self.ports[i].1)
    }

    pub fn name(&self, index: u16) -> Option<&str> {
        match index {
            0 => None,
            i => self.names.get(usize::from(i)).map(String::as_str),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_index_follows_lookup() {
        let mut c = Catalog::with_defaults();
        c.add("myssh=tcp/22,udp/9000-9001".parse().unwrap());
        let idx = c.kernel_index().unwrap();
        let get = |proto: Proto, port| {
            let k = ctrace_common::service_key(proto.number(), port);
            idx.ports
                .iter()
                .find(|(key, _)| *key == k)
                .and_then(|(_, i)| idx.name(*i))
        };
        assert_eq!(get(Proto::Tcp, 22), Some("myssh"));
        assert_eq!(get(Proto::Udp, 9001), Some("myssh"));
        assert_eq!(get(Proto::Udp, 53), Some("dns"));
        assert_eq!(get(Proto::Tcp, 9001), None);
        for (proto, port) in [(Proto::Tcp, 22), (Proto::Udp, 53), (Proto::Tcp, 9001)] {
            let by_scan = get(proto, port);
            assert_eq!(idx.name(idx.index_of(proto.number(), port)), by_scan);
        }
        assert_eq!(idx.name(0), None);
        let mut huge = Catalog::with_defaults();
        huge.add("all=tcp+udp/1-65535".parse().unwrap());
        assert!(
            huge.kernel_index()
                .unwrap_err()
                .to_string()
                .contains("narrow")
        );
    }

    #[test]
    fn defaults_cover_the_incident() {
        let c = Catalog::with_defaults();
        assert_eq!(c.lookup(Proto::Tcp, 22), Some("ssh"));
        assert_eq!(c.lookup(Proto::Tcp, 2380), Some("etcd-peer"));
        assert_eq!(c.lookup(Proto::Tcp, 4420), Some("nvme-tcp"));
        assert_eq!(c.lookup(Proto::Udp, 53), Some("dns"));
        assert_eq!(c.lookup(Proto::Tcp, 53), Some("dns"));
        assert_eq!(c.lookup(Proto::Udp, 41641), Some("tailscale"));
        assert_eq!(c.lookup(Proto::Udp, 22), None, "ssh is tcp only");
        assert_eq!(c.lookup(Proto::Tcp, 9999), None);
    }

    #[test]
    fn user_specs_parse_and_override() {
        let mut c = Catalog::with_defaults();
        c.add("jump-ssh=tcp/22".parse().unwrap());
        c.add("game=udp/27015-27020,tcp/27015".parse().unwrap());
        assert_eq!(c.lookup(Proto::Tcp, 22), Some("jump-ssh"));
        assert_eq!(c.lookup(Proto::Udp, 27017), Some("game"));
        assert_eq!(c.lookup(Proto::Tcp, 27016), None);
        let s: ServiceSpec = "x=tcp+udp/1-2".parse().unwrap();
        assert_eq!(s.to_string(), "x=tcp+udp/1-2");
    }

    #[test]
    fn bad_specs_name_the_bad_part() {
        let err = |s: &str| format!("{:#}", s.parse::<ServiceSpec>().unwrap_err());
        assert!(err("ssh").contains("expected NAME=PROTO/PORT"));
        assert!(err("=tcp/22").contains("name is empty"));
        assert!(err("a b=tcp/22").contains("`a b`"));
        assert!(err("x=icmp/1").contains("unknown protocol `icmp`"));
        assert!(err("x=tcp/0").contains("`0` is not a port"));
        assert!(err("x=tcp/70000").contains("`70000` is not a port"));
        assert!(err("x=tcp/9-3").contains("runs backwards"));
        assert!(err("x=tcp22").contains("`tcp22` is not PROTO/PORT"));
    }

    #[test]
    fn catalog_file_errors_carry_line_numbers() {
        let dir = std::env::temp_dir().join(format!("ctrace-svc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("services.conf");
        std::fs::write(&path, "# mine\nmetrics=tcp/9100\n\nbroken=tcp/x\n").unwrap();
        let mut c = Catalog::default();
        let e = format!("{:#}", c.add_file(&path).unwrap_err());
        assert!(e.contains("services.conf:4"), "{e}");
        assert_eq!(c.lookup(Proto::Tcp, 9100), Some("metrics"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
