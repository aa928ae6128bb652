//! The test guest's workload: parsed from `wss=256M,rate=50000,pattern=random,duty=30` and
//! rendered into the guest command line of ABI.md (the same words, space-separated).
use crate::disk_workload::DiskWorkload;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Which pages of the working set the guest writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    Seq,
    Random,
    Hotcold,
    /// Every page once, in order, then only re-checks (no more writes).
    Once,
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pattern::Seq => "seq",
            Pattern::Random => "random",
            Pattern::Hotcold => "hotcold",
            Pattern::Once => "once",
        })
    }
}

/// What the guest writes into a page (ABI.md "Page contents").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Content {
    /// Every word pseudo-random from (page, generation, word): zstd cannot shrink it.
    #[default]
    Random,
    /// One word in four pseudo-random, the others the generation: zstd shrinks it ~3.5x.
    Compressible,
}

impl fmt::Display for Content {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Content::Random => "random",
            Content::Compressible => "compressible",
        })
    }
}

impl FromStr for Content {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "random" => Ok(Content::Random),
            "compressible" => Ok(Content::Compressible),
            _ => Err(Error::Workload(format!(
                "content={s:?} is not one of random, compressible"
            ))),
        }
    }
}

/// The guest workload (ABI.md "Command line").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Working-set size in bytes (multiple of 4 KiB, at least one page).
    pub wss: u64,
    /// Page writes per second across all vCPUs; 0 = as fast as possible.
    pub rate: u64,
    pub pattern: Pattern,
    /// Busy percentage 1..=100.
    pub duty: u8,
    pub seed: u64,
    /// Page contents; the default (random) is incompressible.
    #[serde(default)]
    pub content: Content,
    /// The disk workload (`disk=64M,iops=2000,...`); off by default.
    #[serde(default)]
    pub disk: DiskWorkload,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            wss: 64 << 20,
            rate: 0,
            pattern: Pattern::Seq,
            duty: 100,
            seed: 1,
            content: Content::Random,
            disk: DiskWorkload::default(),
        }
    }
}

/// Parses `123`, `4K`, `256M`, `1G` (binary suffixes).
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => {
                    return Err(Error::Workload(format!(
                        "{s:?} is not a size (unknown suffix; use K, M or G)"
                    )))
                }
            };
            (&s[..i], mult)
        }
        _ => (s, 1),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| Error::Workload(format!("{s:?} is not a size (e.g. 256M)")))?;
    n.checked_mul(mult)
        .ok_or_else(|| Error::Workload(format!("size {s:?} is too large")))
}

/// Renders a byte size with the largest exact binary suffix.
pub fn format_size(n: u64) -> String {
    for (shift, suffix) in [(30, "G"), (20, "M"), (10, "K")] {
        if n != 0 && n.trailing_zeros() >= shift {
            return format!("{}{suffix}", n >> shift);
        }
    }
    n.to_string()
}

impl FromStr for Workload {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let mut w = Workload::default();
        for word in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            let (key, value) = word
                .split_once('=')
                .ok_or_else(|| Error::Workload(format!("{word:?} is not key=value")))?;
            let num = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| Error::Workload(format!("{key}={v:?} is not a number")))
            };
            match key {
                "wss" => w.wss = parse_size(value)?,
                "rate" => w.rate = num(value)?,
                "seed" => w.seed = num(value)?,
                "duty" => {
                    let d = num(value)?;
                    if !(1..=100).contains(&d) {
                        return Err(Error::Workload(format!("duty={d} is outside 1..=100")));
                    }
                    w.duty = d as u8;
                }
                "pattern" => {
                    w.pattern = match value {
                        "seq" => Pattern::Seq,
                        "random" => Pattern::Random,
                        "hotcold" => Pattern::Hotcold,
                        "once" => Pattern::Once,
                        _ => {
                            return Err(Error::Workload(format!(
                                "pattern={value:?} is not one of seq, random, hotcold, once"
                            )))
                        }
                    }
                }
                "content" => w.content = value.parse()?,
                k if w.disk.parse_key(k, value)? => {}
                _ => {
                    return Err(Error::Workload(format!(
                        "unknown key {key:?} (known: wss, rate, pattern, duty, seed, content, disk, iops, dio, dflush)"
                    )))
                }
            }
        }
        w.disk.validate()?;
        if w.wss == 0 || w.wss % 4096 != 0 {
            return Err(Error::Workload(format!(
                "wss={} must be a non-zero multiple of 4K",
                w.wss
            )));
        }
        Ok(w)
    }
}

impl Workload {
    /// The guest command line (ABI.md): space-separated `key=value` words.
    pub fn cmdline(&self) -> String {
        format!(
            "wss={} rate={} pattern={} duty={} seed={}{}{}",
            format_size(self.wss),
            self.rate,
            self.pattern,
            self.duty,
            self.seed,
            self.content_word().replace(',', " "),
            self.disk.to_string().replace(',', " ")
        )
    }

    /// `,content=...` when not the default, so today's command lines stay as they were.
    fn content_word(&self) -> String {
        match self.content {
            Content::Random => String::new(),
            c => format!(",content={c}"),
        }
    }

    /// Guest RAM this workload needs at least: working set at 16 MiB plus its generation
    /// table (ABI.md memory layout), rounded up to a page.
    /// Saturates at the largest page multiple for absurd sizes (never overflows).
    pub fn min_memory(&self) -> u64 {
        let pages = self.wss / 4096;
        0x0100_0000u64
            .saturating_add(self.wss)
            .saturating_add(pages.saturating_mul(4))
            .checked_next_multiple_of(4096)
            .unwrap_or(u64::MAX - 4095)
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "wss={},rate={},pattern={},duty={},seed={}{}{}",
            format_size(self.wss),
            self.rate,
            self.pattern,
            self.duty,
            self.seed,
            self.content_word(),
            self.disk
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_issue_example() {
        let w: Workload = "wss=256M,rate=50000,pattern=random,duty=30"
            .parse()
            .unwrap();
        assert_eq!(w.wss, 256 << 20);
        assert_eq!(w.rate, 50000);
        assert_eq!(w.pattern, Pattern::Random);
        assert_eq!(w.duty, 30);
        assert_eq!(
            w.cmdline(),
            "wss=256M rate=50000 pattern=random duty=30 seed=1"
        );
        assert_eq!(w.to_string().parse::<Workload>().unwrap(), w);
    }

    #[test]
    fn disk_keys_round_trip() {
        let w: Workload = "wss=8M,disk=64M,iops=2000".parse().unwrap();
        assert_eq!(w.disk.bytes, 64 << 20);
        assert_eq!(
            w.cmdline(),
            "wss=8M rate=0 pattern=seq duty=100 seed=1 disk=64M iops=2000 dio=random dflush=16"
        );
        assert_eq!(w.to_string().parse::<Workload>().unwrap(), w);
        assert!("disk=3G".parse::<Workload>().is_err());
    }

    #[test]
    fn bad_strings_get_clear_errors() {
        for (s, needle) in [
            ("wss=12Q", "unknown suffix"),
            ("wss=abc", "not a size"),
            ("duty=0", "duty"),
            ("duty=101", "duty"),
            ("pattern=zigzag", "pattern"),
            ("speed=3", "unknown key"),
            ("rate", "key=value"),
            ("wss=100", "multiple of 4K"),
            ("wss=99999999999G", "too large"),
            ("content=zeros", "content"),
        ] {
            let err = s.parse::<Workload>().unwrap_err().to_string();
            assert!(err.contains(needle), "{s}: {err}");
        }
    }

    #[test]
    fn content_option_is_parsed_and_only_rendered_when_not_the_default() {
        let w: Workload = "wss=4M,content=compressible".parse().unwrap();
        assert_eq!(w.content, Content::Compressible);
        assert_eq!(
            w.cmdline(),
            "wss=4M rate=0 pattern=seq duty=100 seed=1 content=compressible"
        );
        let r: Workload = "wss=4M,content=random".parse().unwrap();
        assert_eq!(r.content, Content::Random);
        assert_eq!(r.cmdline(), "wss=4M rate=0 pattern=seq duty=100 seed=1");
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,60}") {
            let _ = s.parse::<Workload>();
        }

        #[test]
        fn display_round_trips(pages in 1u64..1_000_000, rate in 0u64..10_000_000, duty in 1u8..=100, seed: u64, p in 0..4, compressible: bool) {
            let pattern = [Pattern::Seq, Pattern::Random, Pattern::Hotcold, Pattern::Once][p as usize];
            let content = if compressible { Content::Compressible } else { Content::Random };
            let w = Workload { wss: pages * 4096, rate, pattern, duty, seed, content, disk: DiskWorkload::default() };
            prop_assert_eq!(w.to_string().parse::<Workload>().unwrap(), w);
        }
    }
}
