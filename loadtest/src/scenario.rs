//! What a run does: from flags, or from a scenario file for repeatable runs.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// A media profile: how one participant sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Opus-like audio: 50 packets/s, 60 to 160 byte payloads.
    Audio,
    /// Video: 30 frames/s, about 1 Mbit/s, frames split into packets of at most 1200 bytes, a
    /// keyframe burst every 3 s.
    Video,
    /// Screen share: 5 frames/s of small updates, a large full-screen frame every 4 s.
    Screen,
}

impl Profile {
    /// Label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Audio => "audio",
            Self::Video => "video",
            Self::Screen => "screen",
        }
    }
}

/// How participants reach their relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TransportMode {
    /// Everyone over UDP.
    Udp,
    /// Everyone over QUIC datagrams.
    Quic,
    /// Alternating: even participants QUIC, odd UDP.
    Mixed,
}

impl TransportMode {
    /// What the mode means, for a report's header.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Udp => "udp (every participant over UDP)",
            Self::Quic => "quic (every participant over QUIC datagrams)",
            Self::Mixed => "mixed (even participants over QUIC, odd over UDP)",
        }
    }
}

/// How participants' UDP legs survive the loss of their relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FailoverMode {
    /// Bind on the backup relay once the relay has been silent for 1 s (`LegConfig::new`).
    Cold,
    /// Keep each leg bound on the backup relay too (a QUIC leg: a second connection) and
    /// switch after 150 ms of silence, with no bind (`LegConfig::hot_standby`).
    Hot,
}

impl FailoverMode {
    /// What the mode means, for a report's header.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Cold => "cold (bind on the backup after 1 s of silence)",
            Self::Hot => "hot (legs bound on the backup too, switch after 150 ms)",
        }
    }
}

/// SRTP protection profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SrtpSuite {
    /// SRTP_AES128_CM_HMAC_SHA1_80.
    AesCm,
    /// SRTP_AEAD_AES_128_GCM.
    AesGcm,
}

impl SrtpSuite {
    /// The profile's registered name (RFC 5764 §4.1.2, RFC 7714 §14.2) and the RFC that
    /// defines its transform.
    pub fn rfc_name(self) -> &'static str {
        match self {
            Self::AesCm => "SRTP_AES128_CM_HMAC_SHA1_80 (RFC 3711)",
            Self::AesGcm => "SRTP_AEAD_AES_128_GCM (RFC 7714)",
        }
    }
}

/// A load-test scenario. Also the scenario file's format (JSON; every field optional).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    /// Concurrent calls.
    pub calls: usize,
    /// Participants per call, 2 to 16.
    pub participants: usize,
    /// How long calls run once all are up.
    #[serde(with = "humantime_serde_compat")]
    pub duration: Duration,
    /// Calls started per second while ramping up.
    pub ramp_up_per_sec: f64,
    /// Media profiles, by weight: each participant draws one.
    pub mix: Vec<(Profile, u32)>,
    /// Transport choice.
    pub transport: TransportMode,
    /// SRTP protection profile.
    pub srtp: SrtpSuite,
    /// Local addresses participants bind, one after another.
    pub client_ips: Vec<IpAddr>,
    /// Seconds between RTCP sender reports of each participant.
    pub rtcp_interval_secs: u64,
    /// Participants who join each call while it runs (AddParticipant, at a random time during
    /// full load) and leave it after `churn_dwell` (RemoveParticipant), one after another; 0:
    /// none. A call's participants and joiners together are at most 16 (a leg index is never
    /// minted twice).
    pub churn: usize,
    /// How long each joiner stays.
    #[serde(with = "humantime_serde_compat")]
    pub churn_dwell: Duration,
    /// How participants' legs fail over.
    pub failover: FailoverMode,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            calls: 10,
            participants: 2,
            duration: Duration::from_secs(10),
            ramp_up_per_sec: 50.0,
            mix: vec![(Profile::Audio, 1)],
            transport: TransportMode::Udp,
            srtp: SrtpSuite::AesCm,
            client_ips: vec![IpAddr::from([127, 0, 0, 1])],
            rtcp_interval_secs: 5,
            churn: 0,
            churn_dwell: Duration::from_secs(2),
            failover: FailoverMode::Cold,
        }
    }
}

mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

impl Scenario {
    /// Reads a scenario file (JSON).
    pub fn from_file(path: &PathBuf) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--scenario: cannot read {}", path.display()))?;
        let s: Self = serde_json::from_str(&text)
            .with_context(|| format!("--scenario: {} is not a valid scenario", path.display()))?;
        s.validate()?;
        Ok(s)
    }

    /// Checks the scenario's ranges; the message names the field.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.calls == 0 || self.calls > 100_000 {
            bail!("calls must be from 1 to 100000");
        }
        if !(2..=16).contains(&self.participants) {
            bail!("participants must be from 2 to 16");
        }
        if self.duration.is_zero() || self.duration > Duration::from_secs(24 * 3600) {
            bail!("duration must be more than 0 and at most 24h");
        }
        if !(self.ramp_up_per_sec > 0.0 && self.ramp_up_per_sec.is_finite()) {
            bail!("ramp_up_per_sec must be a positive number");
        }
        if self.mix.is_empty() || self.mix.iter().all(|(_, w)| *w == 0) {
            bail!("mix must give at least one profile a positive weight");
        }
        if self.client_ips.is_empty() {
            bail!("client_ips must not be empty");
        }
        if self.rtcp_interval_secs == 0 {
            bail!("rtcp_interval_secs must be at least 1");
        }
        if self.participants + self.churn > 16 {
            bail!("churn: participants and joiners of a call are at most 16 together");
        }
        if self.churn > 0
            && (self.churn_dwell < Duration::from_millis(500)
                || self.churn_dwell + Duration::from_secs(1) > self.duration)
        {
            bail!("churn_dwell must be at least 500ms, and 1 s shorter than duration");
        }
        Ok(())
    }

    /// Time spent starting calls.
    pub fn ramp_time(&self) -> Duration {
        Duration::from_secs_f64(self.calls as f64 / self.ramp_up_per_sec)
    }
}

/// Parses an address pool: `A-B` (an inclusive IPv4 range) or a comma-separated list.
pub fn parse_ip_pool(s: &str) -> Result<Vec<IpAddr>, String> {
    if let Some((a, b)) = s.split_once('-') {
        let a: std::net::Ipv4Addr = a
            .trim()
            .parse()
            .map_err(|_| format!("{a:?} is not an IPv4 address"))?;
        let b: std::net::Ipv4Addr = b
            .trim()
            .parse()
            .map_err(|_| format!("{b:?} is not an IPv4 address"))?;
        let (a, b) = (u32::from(a), u32::from(b));
        if a > b || b - a > 65_535 {
            return Err("the range must be ascending and span at most 65536 addresses".into());
        }
        return Ok((a..=b)
            .map(|x| IpAddr::from(std::net::Ipv4Addr::from(x)))
            .collect());
    }
    s.split(',')
        .map(|p| {
            p.trim()
                .parse::<IpAddr>()
                .map_err(|_| format!("{p:?} is not an IP address"))
        })
        .collect()
}

/// Parses a profile mix: `audio`, or `audio=8,video=2`.
pub fn parse_mix(s: &str) -> Result<Vec<(Profile, u32)>, String> {
    use clap::ValueEnum;
    s.split(',')
        .map(|part| {
            let (name, weight) = part.split_once('=').unwrap_or((part, "1"));
            let profile = Profile::from_str(name.trim(), true)
                .map_err(|_| format!("unknown profile {name:?}"))?;
            let weight: u32 = weight
                .trim()
                .parse()
                .map_err(|_| format!("weight {weight:?} is not a whole number"))?;
            Ok((profile, weight))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_and_mixes_parse() {
        let pool = parse_ip_pool("127.0.0.2-127.0.0.254").unwrap();
        assert_eq!(pool.len(), 253);
        assert_eq!(pool[0].to_string(), "127.0.0.2");
        assert_eq!(parse_ip_pool("127.0.0.2,::1").unwrap().len(), 2);
        assert!(parse_ip_pool("127.0.0.9-127.0.0.2").is_err());
        assert!(parse_ip_pool("x").is_err());
        assert_eq!(
            parse_mix("audio=8,video=2").unwrap(),
            vec![(Profile::Audio, 8), (Profile::Video, 2)]
        );
        assert_eq!(parse_mix("screen").unwrap(), vec![(Profile::Screen, 1)]);
        assert!(parse_mix("smell=1").is_err());
    }

    #[test]
    fn scenario_files_round_trip_and_validate() {
        let s = Scenario {
            calls: 3,
            duration: Duration::from_secs(20),
            ..Scenario::default()
        };
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"duration\":\"20s\""));
        let back: Scenario = serde_json::from_str(&json).unwrap();
        assert_eq!(back.calls, 3);
        assert_eq!(back.duration, Duration::from_secs(20));
        let partial: Scenario =
            serde_json::from_str(r#"{"calls": 7, "mix": [["video", 1]]}"#).unwrap();
        assert_eq!((partial.calls, partial.participants), (7, 2));
        assert!(
            serde_json::from_str::<Scenario>(r#"{"calsl": 7}"#).is_err(),
            "typos are refused"
        );
        let bad = Scenario {
            participants: 17,
            ..Scenario::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("participants")
        );
        let crowded = Scenario {
            participants: 10,
            churn: 7,
            ..Scenario::default()
        };
        assert!(
            crowded
                .validate()
                .unwrap_err()
                .to_string()
                .contains("churn")
        );
        let long_stay = Scenario {
            churn: 1,
            churn_dwell: Duration::from_secs(10),
            ..Scenario::default()
        };
        assert!(
            long_stay
                .validate()
                .unwrap_err()
                .to_string()
                .contains("churn_dwell")
        );
    }
}
