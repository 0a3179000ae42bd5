//! Renders a [`Ruleset`] in `nft -f` syntax: what `mesh-redirect plan` prints and what error
//! and CHECK messages quote. A user can paste it into `nft -c -f -` to have nft validate it.

use crate::policy::Passthrough6;
use crate::ruleset::{
    Action, Chain, ChainKind, Cmp, Elems, Family, HookPoint, L4, Match, Rule, Ruleset, Set, TABLE,
};
use std::fmt::Write;
use std::net::IpAddr;

fn family_kw(f: Family) -> &'static str {
    match f {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

fn addr_kw(a: &IpAddr) -> &'static str {
    match a {
        IpAddr::V4(_) => "ip",
        IpAddr::V6(_) => "ip6",
    }
}

fn l4_kw(p: L4) -> &'static str {
    match p {
        L4::Tcp => "tcp",
        L4::Udp => "udp",
    }
}

fn op(c: Cmp) -> &'static str {
    match c {
        Cmp::Eq => "",
        Cmp::Ne => "!= ",
    }
}

/// One rule, e.g. `meta l4proto tcp tcp dport 15008 return comment "…"`.
pub fn rule(r: &Rule) -> String {
    let mut parts: Vec<String> = Vec::new();
    // The transport keyword for port matches: the rule's l4proto if it has one, else `th`
    // (the chain is only entered for TCP and UDP, which share the port offset).
    let mut l4 = "th";
    for m in &r.matches {
        parts.push(match m {
            Match::NfProto(f) => format!("meta nfproto {}", family_name(*f)),
            Match::L4Proto(p) => {
                l4 = l4_kw(*p);
                format!("meta l4proto {}", l4_kw(*p))
            }
            Match::Iifname(n) => format!("iifname \"{n}\""),
            Match::Oifname(n) => format!("oifname \"{n}\""),
            Match::IifnameIn(s) => format!("iifname @{s}"),
            Match::IifnamePrefix(p) => format!("iifname \"{p}*\""),
            Match::OifnamePrefix(p) => format!("oifname \"{p}*\""),
            Match::SaddrIn(f, s) => format!("{} saddr @{s}", family_kw(*f)),
            Match::DportRange(a, b) => format!("{l4} dport {a}-{b}"),
            Match::SkUidRange(a, b) => format!("meta skuid {a}-{b}"),
            Match::CtInvalid => "ct state invalid".to_string(),
            Match::OifnameIn(s) => format!("oifname @{s}"),
            Match::Saddr(a) => format!("{} saddr {a}", addr_kw(a)),
            Match::Daddr(c, a) => format!("{} daddr {}{a}", addr_kw(a), op(*c)),
            Match::DaddrIn(f, s) => format!("{} daddr @{s}", family_kw(*f)),
            Match::Dport(c, p) => format!("{l4} dport {}{p}", op(*c)),
            Match::DportIn(s) => format!("{l4} dport @{s}"),
            Match::SkUid(c, u) => format!("meta skuid {}{u}", op(*c)),
            Match::SkGid(c, g) => format!("meta skgid {}{g}", op(*c)),
            Match::Sport(p) => format!("{l4} sport {p}"),
            Match::Mark(c, m) => format!("meta mark {}{m:#010x}", op(*c)),
            Match::CtMark(m) => format!("ct mark {m:#010x}"),
            Match::CtEstablished => "ct state established,related".to_string(),
        });
    }
    parts.push(match &r.action {
        Action::Return => "return".into(),
        Action::Accept => "accept".into(),
        Action::Drop => "drop".into(),
        Action::Jump(c) => format!("jump {c}"),
        Action::Redirect(p) => format!("redirect to :{p}"),
        Action::Tproxy { family, port, mark } => {
            format!(
                "tproxy {} to :{port} meta mark set {mark:#010x} accept",
                family_kw(*family)
            )
        }
        Action::SetMark(m) => format!("meta mark set {m:#010x}"),
        Action::SetMarkAccept(m) => format!("meta mark set {m:#010x} accept"),
        Action::SaveMark => "ct mark set meta mark".into(),
        Action::RestoreMark => "meta mark set ct mark".into(),
        Action::CtZone(z) => format!("ct zone set {z} return"),
    });
    if !r.comment.is_empty() {
        parts.push(format!("comment \"{}\"", r.comment));
    }
    parts.join(" ")
}

fn family_name(f: Family) -> &'static str {
    match f {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    }
}

fn set(out: &mut String, s: &Set) {
    let (ty, interval, elems): (&str, bool, Vec<String>) = match &s.elems {
        Elems::V4(v) => ("ipv4_addr", true, v.iter().map(|n| n.to_string()).collect()),
        Elems::V6(v) => ("ipv6_addr", true, v.iter().map(|n| n.to_string()).collect()),
        Elems::Ports(v) => (
            "inet_service",
            false,
            v.iter().map(|p| p.to_string()).collect(),
        ),
        Elems::PortRanges(v) => (
            "inet_service",
            true,
            v.iter()
                .map(|(a, b)| {
                    if a == b {
                        a.to_string()
                    } else {
                        format!("{a}-{b}")
                    }
                })
                .collect(),
        ),
        Elems::Ifnames(v) => (
            "ifname",
            false,
            v.iter().map(|n| format!("\"{n}\"")).collect(),
        ),
    };
    let _ = writeln!(out, "\tset {} {{", s.name);
    let _ = writeln!(out, "\t\ttype {ty}");
    if interval {
        let _ = writeln!(out, "\t\tflags interval");
    }
    // Eight elements per line keeps 5,000-element sets readable and diffable.
    let lines: Vec<String> = elems.chunks(8).map(|c| c.join(", ")).collect();
    let _ = writeln!(out, "\t\telements = {{ {} }}", lines.join(",\n\t\t\t     "));
    let _ = writeln!(out, "\t}}");
}

fn chain(out: &mut String, c: &Chain) {
    let _ = writeln!(out, "\tchain {} {{", c.name);
    if let Some(h) = c.hook {
        let kind = match h.kind {
            ChainKind::Nat => "nat",
            ChainKind::Filter => "filter",
            ChainKind::Route => "route",
        };
        let point = match h.point {
            HookPoint::Prerouting => "prerouting",
            HookPoint::Output => "output",
        };
        let _ = writeln!(
            out,
            "\t\ttype {kind} hook {point} priority {}; policy accept;",
            h.priority
        );
    }
    for r in &c.rules {
        let _ = writeln!(out, "\t\t{}", rule(r));
    }
    let _ = writeln!(out, "\t}}");
}

/// The whole transaction ADD sends, as `nft -f` input: replace the table atomically.
pub fn render(rs: &Ruleset) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# mesh-redirect: what ADD installs, as one transaction (into a fresh namespace ADD sends only\n# the `table` part, creating it exclusively; over an existing table, all of this)"
    );
    let _ = writeln!(out, "add table inet {TABLE}");
    let _ = writeln!(out, "delete table inet {TABLE}");
    let _ = writeln!(out, "table inet {TABLE} {{");
    for s in &rs.sets {
        set(&mut out, s);
        out.push('\n');
    }
    for (i, c) in rs.chains.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        chain(&mut out, c);
    }
    let _ = writeln!(out, "}}");
    let six = match rs.passthrough6 {
        Passthrough6::No => None,
        Passthrough6::Yes => Some(""),
        Passthrough6::IfIpv6Enabled => Some(" (if IPv6 is on in the pod's namespace)"),
    };
    if rs.routing.is_some() || six.is_some() {
        let _ = writeln!(
            out,
            "# and, in the same logical transaction (rtnetlink, inside the pod's namespace):"
        );
    }
    if let Some(r) = &rs.routing {
        for o in r.objects(true) {
            let _ = writeln!(out, "#   {}", r.describe(o));
        }
    }
    if let Some(when) = six {
        let _ = writeln!(
            out,
            "#   ip -6 addr add ::6/128 dev lo (the proxy's IPv6 inbound-passthrough source){when}"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ruleset::{Cmp, Family, L4, Match, Rule};
    use std::net::IpAddr;

    fn r(matches: Vec<Match>, action: Action) -> Rule {
        Rule {
            matches,
            action,
            comment: "",
        }
    }

    #[test]
    fn rules_render_as_nft_syntax() {
        let lo6: IpAddr = "::1".parse().unwrap();
        assert_eq!(
            rule(&r(
                vec![
                    Match::Oifname("lo".into()),
                    Match::NfProto(Family::V6),
                    Match::Daddr(Cmp::Ne, lo6),
                    Match::L4Proto(L4::Tcp),
                    Match::Dport(Cmp::Ne, 15008),
                    Match::SkUid(Cmp::Eq, 1337),
                ],
                Action::Redirect(15006)
            )),
            "oifname \"lo\" meta nfproto ipv6 ip6 daddr != ::1 meta l4proto tcp tcp dport != 15008 meta skuid 1337 redirect to :15006"
        );
        // Without an l4proto the port match is the transport-header one.
        assert_eq!(
            rule(&r(vec![Match::DportIn("p")], Action::Return)),
            "th dport @p return"
        );
        assert_eq!(
            rule(&Rule {
                matches: vec![Match::L4Proto(L4::Udp), Match::Dport(Cmp::Eq, 53)],
                action: Action::Redirect(15053),
                comment: "dns",
            }),
            "meta l4proto udp udp dport 53 redirect to :15053 comment \"dns\""
        );
    }

    #[test]
    fn render_replaces_the_table_in_one_transaction() {
        let text = render(&crate::plugin::default_ruleset());
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(lines[0], "add table inet mesh_redirect");
        assert_eq!(lines[1], "delete table inet mesh_redirect");
        assert!(text.contains("type nat hook prerouting priority -100; policy accept;"));
        assert!(text.contains("elements = { 15020, 15021, 15090 }"));
    }
}
