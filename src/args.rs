//! Command-line arguments shared by the commands (`plan`, `install`, `uninstall`, the agent):
//! `--flag value` / `--flag=value` pairs, switches, and each flag's environment variable.
//! Below both `cli` and `install`, so neither imports the other.

/// A command's failure: bad usage (exit 2, with the usage text) or a failure to do the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CliError {
    Usage(String),
    Failed(String),
}

/// One flag a command takes: its one declaration, from which parsing and the usage text
/// both come.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub flag: &'static str,
    /// Read when the flag is not given (empty: none).
    pub env: &'static str,
    /// Takes no value on the command line (`--keep-binary`); from the env, `true`/`1` turn it on.
    pub switch: bool,
    /// What the value looks like in the usage text (`DIR`, `HOST:PORT`; empty for a switch).
    pub arg: &'static str,
    /// What it does, for the usage text.
    pub help: &'static str,
}

impl Spec {
    /// A flag that takes a value.
    pub const fn value(
        flag: &'static str,
        env: &'static str,
        arg: &'static str,
        help: &'static str,
    ) -> Spec {
        Spec {
            flag,
            env,
            switch: false,
            arg,
            help,
        }
    }

    /// A flag that takes none.
    pub const fn switch(flag: &'static str, env: &'static str, help: &'static str) -> Spec {
        Spec {
            flag,
            env,
            switch: true,
            arg: "",
            help,
        }
    }
}

/// The usage lines for `specs`: each flag, its value, what it does and its variable.
pub fn usage(specs: &[Spec]) -> String {
    let mut out = String::new();
    for s in specs {
        let head = if s.switch {
            s.flag.to_string()
        } else {
            format!("{} {}", s.flag, s.arg)
        };
        out.push_str(&format!("  {head}\n"));
        let mut help = s.help.to_string();
        if !s.env.is_empty() {
            help.push_str(&format!(
                " (env {}{})",
                s.env,
                if s.switch { "=true" } else { "" }
            ));
        }
        out.push_str(&wrap(&help, 6, 96));
    }
    out
}

/// `text` wrapped at `width` columns, each line indented by `indent` spaces.
fn wrap(text: &str, indent: usize, width: usize) -> String {
    let pad = " ".repeat(indent);
    let (mut out, mut line) = (String::new(), String::new());
    for w in text.split_whitespace() {
        if !line.is_empty() && indent + line.len() + 1 + w.len() > width {
            out.push_str(&format!("{pad}{line}\n"));
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(w);
    }
    if !line.is_empty() {
        out.push_str(&format!("{pad}{line}\n"));
    }
    out
}

/// Where a flag's environment variable is read (normally `std::env::var`).
type EnvLookup<'a> = Box<dyn Fn(&str) -> Option<String> + 'a>;

/// Parsed flags: what the command line gave, then the environment.
pub struct Parsed<'a> {
    specs: &'a [Spec],
    given: Vec<(String, String)>,
    switched: Vec<&'static str>,
    env: EnvLookup<'a>,
}

/// Parses `args` against `specs`; every flag must be known.
pub fn parse<'a>(
    args: &[String],
    specs: &'a [Spec],
    env: impl Fn(&str) -> Option<String> + 'a,
) -> Result<Parsed<'a>, CliError> {
    let mut given = Vec::new();
    let mut switched = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (name, value) = match a.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let spec = specs
            .iter()
            .find(|s| s.flag == name)
            .ok_or_else(|| CliError::Usage(format!("unknown option {name:?}")))?;
        if spec.switch {
            if value.is_some() {
                return Err(CliError::Usage(format!("{name} takes no value")));
            }
            switched.push(spec.flag);
            continue;
        }
        let value = match value {
            Some(v) => v,
            None => it
                .next()
                .cloned()
                .ok_or_else(|| CliError::Usage(format!("{name} needs a value")))?,
        };
        given.push((name.to_string(), value));
    }
    Ok(Parsed {
        specs,
        given,
        switched,
        env: Box::new(env),
    })
}

impl Parsed<'_> {
    /// The flag's value (the last one given wins), else its environment variable; empty
    /// values count as unset.
    pub fn get(&self, flag: &str) -> Option<String> {
        let from_flag = self
            .given
            .iter()
            .rev()
            .find(|(n, _)| n == flag)
            .map(|(_, v)| v.clone());
        from_flag
            .or_else(|| {
                self.specs
                    .iter()
                    .find(|s| s.flag == flag && !s.env.is_empty())
                    .and_then(|s| (self.env)(s.env))
            })
            .filter(|v| !v.is_empty())
    }

    /// A switch: given on the command line, or its variable is `true` or `1`.
    pub fn on(&self, flag: &str) -> bool {
        self.switched.contains(&flag) || self.get(flag).is_some_and(|v| v == "true" || v == "1")
    }

    /// A value parsed with `f`, or a usage error naming the flag and the value.
    pub fn parsed<T>(
        &self,
        flag: &str,
        what: &str,
        f: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>, CliError> {
        match self.get(flag) {
            None => Ok(None),
            Some(v) => f(&v)
                .map(Some)
                .ok_or_else(|| CliError::Usage(format!("{flag} {v:?} is not {what}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECS: &[Spec] = &[
        Spec::value("--dir", "X_DIR", "DIR", "a directory"),
        Spec::switch("--keep", "X_KEEP", "keep it"),
    ];

    #[test]
    fn usage_comes_from_the_declarations() {
        assert_eq!(
            usage(SPECS),
            "  --dir DIR\n      a directory (env X_DIR)\n  --keep\n      keep it (env X_KEEP=true)\n"
        );
    }

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn flags_env_and_switches() {
        let p = parse(&args(&["--dir", "/a", "--dir=/b"]), SPECS, |_| None).unwrap();
        assert_eq!(p.get("--dir").as_deref(), Some("/b"));
        assert!(!p.on("--keep"));
        let p = parse(&args(&["--keep"]), SPECS, |k| {
            (k == "X_DIR").then(|| "/env".to_string())
        })
        .unwrap();
        assert_eq!(p.get("--dir").as_deref(), Some("/env"));
        assert!(p.on("--keep"));
        let p = parse(&[], SPECS, |k| (k == "X_KEEP").then(|| "1".to_string())).unwrap();
        assert!(p.on("--keep"));
        assert_eq!(
            p.parsed("--dir", "a number", |v| v.parse::<u32>().ok()),
            Ok(None)
        );
    }

    #[test]
    fn errors() {
        for bad in [
            vec!["--bogus", "1"],
            vec!["--dir"],
            vec!["--keep=yes"],
            vec!["positional"],
        ] {
            assert!(
                matches!(parse(&args(&bad), SPECS, |_| None), Err(CliError::Usage(_))),
                "{bad:?}"
            );
        }
        let p = parse(&args(&["--dir", "x"]), SPECS, |_| None).unwrap();
        let e = p.parsed("--dir", "a number", |v| v.parse::<u32>().ok());
        assert_eq!(
            e,
            Err(CliError::Usage("--dir \"x\" is not a number".into()))
        );
    }
}
