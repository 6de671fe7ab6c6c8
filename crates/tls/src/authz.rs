//! QEMU's authorization objects: `authz-simple` (one allowed identity) and `authz-list` (rules
//! tried in order, exact or glob, then a default policy). For TLS the identity is the peer
//! certificate's distinguished name as [`crate::cert::gnutls_dn`] prints it, so a rule written
//! for QEMU (`CN=laptop.example.com,O=Example Org,…` in the order the certificate holds it)
//! means the same here.

/// Whether a rule or a default lets an identity in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// `deny`.
    Deny,
    /// `allow`.
    Allow,
}

impl Policy {
    /// QAPI's `QAuthZListPolicy` names.
    pub const NAMES: [&'static str; 2] = ["deny", "allow"];

    /// From a QAPI name (already checked against [`Policy::NAMES`]).
    pub fn from_name(s: &str) -> Policy {
        if s == "allow" {
            Policy::Allow
        } else {
            Policy::Deny
        }
    }

    /// The QAPI name.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Deny => "deny",
            Policy::Allow => "allow",
        }
    }
}

/// How a rule's `match` is compared with an identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `exact`: the strings are equal.
    Exact,
    /// `glob`: `*` matches any run of characters, `?` any one character (GLib's
    /// `g_pattern_match_simple`).
    Glob,
}

impl Format {
    /// QAPI's `QAuthZListFormat` names.
    pub const NAMES: [&'static str; 2] = ["exact", "glob"];

    /// The QAPI name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Exact => "exact",
            Format::Glob => "glob",
        }
    }
}

/// One `authz-list` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The string or pattern matched against the identity.
    pub pattern: String,
    /// What a match decides.
    pub policy: Policy,
    /// How `pattern` is compared.
    pub format: Format,
}

/// An authorization object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authz {
    /// `authz-simple`: exactly this identity is allowed.
    Simple {
        /// The allowed identity.
        identity: String,
    },
    /// `authz-list`: the first matching rule decides, else `policy`.
    List {
        /// The default when no rule matches.
        policy: Policy,
        /// The rules, in order.
        rules: Vec<Rule>,
    },
}

impl Authz {
    /// Whether `identity` is allowed.
    pub fn is_allowed(&self, identity: &str) -> bool {
        match self {
            Authz::Simple { identity: id } => id == identity,
            Authz::List { policy, rules } => {
                for r in rules {
                    let hit = match r.format {
                        Format::Exact => r.pattern == identity,
                        Format::Glob => glob_match(&r.pattern, identity),
                    };
                    if hit {
                        return r.policy == Policy::Allow;
                    }
                }
                *policy == Policy::Allow
            }
        }
    }
}

/// `*` and `?` wildcards over characters, as `g_pattern_match_simple` (no escapes, no
/// classes). Iterative with one backtrack point, so no pattern makes it slow.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_is_glibs_simple_pattern() {
        assert!(glob_match("CN=*,O=QEMU", "CN=client.qemu.org,O=QEMU"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(!glob_match("CN=*.qemu.org", "CN=evil.org"));
        assert!(glob_match("**a**", "xxaxx"));
        assert!(!glob_match("", "x"));
        assert!(glob_match(&"*a".repeat(30), &"a".repeat(40)));
        assert!(!glob_match(&"*a".repeat(30), &"a".repeat(29)));
    }

    #[test]
    fn list_rules_in_order_then_default() {
        let a = Authz::List {
            policy: Policy::Deny,
            rules: vec![
                Rule {
                    pattern: "CN=bad,O=x".into(),
                    policy: Policy::Deny,
                    format: Format::Exact,
                },
                Rule {
                    pattern: "CN=*,O=x".into(),
                    policy: Policy::Allow,
                    format: Format::Glob,
                },
            ],
        };
        assert!(!a.is_allowed("CN=bad,O=x"));
        assert!(a.is_allowed("CN=good,O=x"));
        assert!(!a.is_allowed("CN=good,O=y"));
        let s = Authz::Simple {
            identity: "CN=a".into(),
        };
        assert!(s.is_allowed("CN=a"));
        assert!(!s.is_allowed("CN=a,O=b"));
    }
}
