//! `--check-config`, as `nginx -t`: a binary validates its flags, environment and files, prints
//! the settings it would run with (secrets redacted, never their values), and exits 0, or 64
//! with the message naming the field, before binding anything.

use std::fmt::{self, Display, Write as _};

/// The effective settings of one binary, in the order they are added.
#[derive(Debug)]
pub struct Effective {
    binary: &'static str,
    lines: Vec<(&'static str, String)>,
}

impl Effective {
    /// Settings of `binary` (its name, as in `--help`).
    pub fn new(binary: &'static str) -> Self {
        Self {
            binary,
            lines: Vec::new(),
        }
    }

    /// A setting, named by its flag without the dashes.
    pub fn set(mut self, flag: &'static str, value: impl Display) -> Self {
        self.lines.push((flag, value.to_string()));
        self
    }

    /// An optional setting: `unset` when `None`.
    pub fn opt(self, flag: &'static str, value: Option<impl Display>) -> Self {
        match value {
            Some(v) => self.set(flag, v),
            None => self.set(flag, "unset"),
        }
    }

    /// A list, comma-separated: `none` when empty.
    pub fn list<T: Display>(self, flag: &'static str, values: &[T]) -> Self {
        if values.is_empty() {
            return self.set(flag, "none");
        }
        let mut s = String::new();
        for (i, v) in values.iter().enumerate() {
            let _ = write!(s, "{}{v}", if i == 0 { "" } else { "," });
        }
        self.set(flag, s)
    }

    /// The key ring: where it came from and its key ids, never a secret.
    pub fn key_ring(self, source: impl Display, keys: &veil_protocol::KeyRing) -> Self {
        let ids: Vec<String> = keys.key_ids().iter().map(|k| k.0.to_string()).collect();
        self.set(
            "key-file",
            format!(
                "{source} (key ids {}, signing {})",
                ids.join(","),
                keys.signing_key_id().0
            ),
        )
    }

    /// Secret values: only how many are set, never what they are.
    pub fn secret(self, flag: &'static str, count: usize) -> Self {
        match count {
            0 => self.set(flag, "unset"),
            1 => self.set(flag, "<redacted: 1 value>"),
            n => self.set(flag, format!("<redacted: {n} values>")),
        }
    }

    /// Prints the settings on standard output and exits 0.
    pub fn print_and_exit(self) -> ! {
        print!("{self}");
        std::process::exit(0);
    }
}

impl Display for Effective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}: configuration is valid", self.binary)?;
        let width = self.lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in &self.lines {
            writeln!(f, "  {k:<width$} = {v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_show_only_their_count() {
        let out = Effective::new("veil-x")
            .set("udp-addr", "0.0.0.0:1")
            .secret("admin-tokens", 2)
            .secret("relay-tokens", 0)
            .list::<String>("controller", &[])
            .opt("node-id", None::<&str>)
            .to_string();
        assert!(out.starts_with("veil-x: configuration is valid\n"), "{out}");
        assert!(
            out.contains("  admin-tokens = <redacted: 2 values>\n"),
            "{out}"
        );
        assert!(out.contains("  relay-tokens = unset\n"), "{out}");
        assert!(out.contains("  controller   = none\n"), "{out}");
        assert!(out.contains("  node-id      = unset\n"), "{out}");
    }
}
