//! The librdkafka settings an operator gives every edow client, the way the Kafka ecosystem takes them: a client
//! properties file (`--kafka-config FILE`, `EDOW_KAFKA_CONFIG_FILE`; `key=value` lines as Java clients read),
//! one environment variable per property (`EDOW_KAFKA_SECURITY_PROTOCOL=SASL_SSL` is `security.protocol`), and
//! `--kafka-option KEY=VALUE` (or `EDOW_KAFKA_OPTIONS=k=v,k=v`); later sources win, in that order.
//!
//! Secrets (passwords, private keys, client secrets) come from the file or their own environment variable,
//! never from `--kafka-option`: a flag is visible to every user of the machine in the process list. No secret is
//! ever printed: [`redacted`] is how settings are shown, in logs and in `Debug`.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// Environment variables with the `EDOW_KAFKA_` prefix that are edow's own, not librdkafka properties.
const NOT_PROPERTIES: [&str; 2] = ["EDOW_KAFKA_OPTIONS", "EDOW_KAFKA_CONFIG_FILE"];
const ENV_PREFIX: &str = "EDOW_KAFKA_";
/// Largest properties file read.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// librdkafka settings edow's guarantees rest on (with their aliases): an operator may not change them.
/// Offsets reset to the earliest record and end-of-partition events are what restore, readers and new groups
/// rely on; a static or transactional id in a config shared by replicas would fence them from one another.
pub const FIXED: [&str; 16] = [
    "bootstrap.servers",
    "metadata.broker.list",
    "group.id",
    "group.instance.id",
    "group.protocol",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "enable.partition.eof",
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "partitioner",
    "isolation.level",
    "transactional.id",
    "partition.assignment.strategy",
];

/// Java clients' settings that librdkafka does not know, with what to write instead; refused with that advice
/// (and without echoing the value, which for JAAS holds a password).
const JAVA_ONLY: [(&str, &str); 2] = [
    (
        "sasl.jaas.config",
        "librdkafka takes sasl.username and sasl.password (EDOW_KAFKA_SASL_USERNAME, EDOW_KAFKA_SASL_PASSWORD)",
    ),
    (
        "ssl.truststore.location",
        "librdkafka takes a PEM file as ssl.ca.location",
    ),
];

/// Whether `key` holds a secret: never taken from a flag, never shown.
pub fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "passphrase",
        "jaas",
        "private.key",
        "key.pem",
    ]
    .iter()
    .any(|part| key.contains(part))
        || key == "ssl_key"
        || key == "sasl.oauthbearer.config"
}

/// `text` with the value of every secret among `settings` replaced by `***`: for errors that quote settings
/// (librdkafka's configuration errors print the value they refused).
pub fn scrub(text: &str, settings: &[(String, String)]) -> String {
    let mut secrets: Vec<&str> = settings
        .iter()
        .filter(|(k, v)| is_secret(k) && !v.is_empty())
        .map(|(_, v)| v.as_str())
        .collect();
    // The longest first, so that a secret inside another does not leave the rest of the longer one showing.
    secrets.sort_by_key(|v| std::cmp::Reverse(v.len()));
    let mut scrubbed = text.to_string();
    for value in secrets {
        scrubbed = scrubbed.replace(value, "***");
    }
    scrubbed
}

/// `settings` as they may be shown: every secret's value is `***`.
pub fn redacted(settings: &[(String, String)]) -> Vec<(String, String)> {
    settings
        .iter()
        .map(|(k, v)| {
            let shown = if is_secret(k) {
                "***".to_string()
            } else {
                v.clone()
            };
            (k.clone(), shown)
        })
        .collect()
}

/// Refuses a setting edow fixes, naming it.
fn check_not_fixed(key: &str, source: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !FIXED.contains(&key),
        "{source}: '{key}' is set by edow and cannot be changed: exactly-once processing depends on it \
         (bootstrap servers have their own option)"
    );
    if let Some((_, instead)) = JAVA_ONLY.iter().find(|(java, _)| *java == key) {
        anyhow::bail!("{source}: '{key}' is a Java client setting: {instead}");
    }
    Ok(())
}

/// The settings of a `key=value` properties file (`#` and `!` start comments, as in Java's); `path` names it in
/// errors.
pub fn parse_properties(text: &str, path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let mut settings = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        let at = format!("{} line {}", path.display(), number + 1);
        let Some((key, value)) = line.split_once('=').or_else(|| line.split_once(':')) else {
            anyhow::bail!("{at}: write key=value, e.g. security.protocol=SASL_SSL");
        };
        let key = key.trim();
        anyhow::ensure!(!key.is_empty(), "{at}: the key is empty");
        check_not_fixed(key, &at)?;
        settings.push((key.to_string(), value.trim().to_string()));
    }
    Ok(settings)
}

/// The settings of the `EDOW_KAFKA_*` variables among `vars`: the rest of the name, lower case, `_` as `.`.
pub fn from_environment(
    vars: impl Iterator<Item = (String, String)>,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut settings = Vec::new();
    for (name, value) in vars {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if NOT_PROPERTIES.contains(&name.as_str()) || rest.is_empty() {
            continue;
        }
        let key = rest.to_ascii_lowercase().replace('_', ".");
        check_not_fixed(&key, &name)?;
        settings.push((key, value));
    }
    settings.sort();
    Ok(settings)
}

/// Every setting from the file, then the environment, then the flags (already parsed by
/// [`parse_flag_option`]); later ones win where keys repeat, since librdkafka takes the last value set.
pub fn gather(
    file: Option<&Path>,
    flags: &[(String, String)],
) -> anyhow::Result<Vec<(String, String)>> {
    refuse_secret_flags(flags)?;
    let mut settings = Vec::new();
    if let Some(path) = file {
        let size = std::fs::metadata(path)
            .with_context(|| format!("reading the Kafka client properties {}", path.display()))?
            .len();
        anyhow::ensure!(
            size <= MAX_FILE_BYTES,
            "the Kafka client properties {} are {size} bytes, over {MAX_FILE_BYTES}",
            path.display()
        );
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the Kafka client properties {}", path.display()))?;
        settings.extend(parse_properties(&text, path)?);
    }
    // Variables that are not Unicode cannot be librdkafka settings; `vars()` would panic on them.
    let vars = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
    settings.extend(from_environment(vars)?);
    settings.extend(flags.iter().filter(|(k, _)| !k.is_empty()).cloned());
    Ok(settings)
}

/// A `--kafka-option KEY=VALUE`; an empty text (an empty variable) sets nothing. Refuses what edow fixes
/// (secrets are refused when the settings are gathered).
pub fn parse_flag_option(text: &str) -> Result<(String, String), String> {
    if text.trim().is_empty() {
        return Ok((String::new(), String::new()));
    }
    let Some((key, value)) = text.split_once('=').map(|(k, v)| (k.trim(), v.trim())) else {
        return Err(format!(
            "'{text}' is not a librdkafka setting of the form KEY=VALUE (e.g. linger.ms=0)"
        ));
    };
    if key.is_empty() {
        return Err(format!(
            "'{text}' is not a librdkafka setting of the form KEY=VALUE (e.g. linger.ms=0)"
        ));
    }
    // A secret is refused by `gather`, not here: a parser's refusal is printed with the whole value.
    if is_secret(key) {
        return Ok((key.to_string(), value.to_string()));
    }
    check_not_fixed(key, "--kafka-option").map_err(|e| e.to_string())?;
    Ok((key.to_string(), value.to_string()))
}

/// Refuses a secret among the flags, naming its key and where to give it instead, never its value.
fn refuse_secret_flags(flags: &[(String, String)]) -> anyhow::Result<()> {
    if let Some((key, _)) = flags.iter().find(|(k, _)| is_secret(k)) {
        let variable = format!("{ENV_PREFIX}{}", key.to_ascii_uppercase().replace('.', "_"));
        anyhow::bail!(
            "--kafka-option '{key}' is a secret and is not taken from a flag (the process list shows flags to every \
             user): set {variable}, or put it in the --kafka-config file"
        );
    }
    Ok(())
}

/// Ends a binary's `main`: on an error, prints it (with every secret of `settings` scrubbed, as librdkafka's
/// configuration errors quote values) and exits with 1.
pub fn exit_on_error(result: anyhow::Result<()>, settings: &[(String, String)]) {
    if let Err(e) = result {
        eprintln!("Error: {}", scrub(&format!("{e:?}"), settings));
        std::process::exit(1);
    }
}

/// The operator's Kafka settings, as every binary takes them.
#[derive(clap::Args, Clone, Default)]
pub struct KafkaArgs {
    /// A librdkafka setting over edow's own, as KEY=VALUE, for every client (e.g. security.protocol=SSL,
    /// linger.ms=0); repeat it, or comma-separate them in the variable. Not for secrets: use EDOW_KAFKA_<KEY>
    /// (e.g. EDOW_KAFKA_SASL_PASSWORD) or --kafka-config.
    #[arg(
        long = "kafka-option",
        global = true,
        env = "EDOW_KAFKA_OPTIONS",
        value_delimiter = ',',
        value_parser = parse_flag_option
    )]
    pub kafka_options: Vec<(String, String)>,
    /// A client properties file (key=value lines, as Java clients read), e.g. with sasl.mechanism,
    /// sasl.username, sasl.password and ssl.ca.location. Any EDOW_KAFKA_<KEY> variable sets one property too.
    #[arg(long = "kafka-config", global = true, env = "EDOW_KAFKA_CONFIG_FILE")]
    pub kafka_config: Option<PathBuf>,
}

impl std::fmt::Debug for KafkaArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaArgs")
            .field("kafka_options", &redacted(&self.kafka_options))
            .field("kafka_config", &self.kafka_config)
            .finish()
    }
}

impl KafkaArgs {
    /// Every setting, from the file, the environment and the flags.
    pub fn settings(&self) -> anyhow::Result<Vec<(String, String)>> {
        gather(self.kafka_config.as_deref(), &self.kafka_options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Iterator<Item = (String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn environment_variables_name_their_property() {
        let settings = from_environment(vars(&[
            ("EDOW_KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("EDOW_KAFKA_SASL_PASSWORD", "hunter2"),
            ("EDOW_KAFKA_OPTIONS", "linger.ms=1"),
            ("EDOW_KAFKA_CONFIG_FILE", "/etc/kafka.properties"),
            ("EDOW_BOOTSTRAP_SERVERS", "x:9092"),
            ("PATH", "/bin"),
        ]))
        .unwrap();
        assert_eq!(
            settings,
            [
                ("sasl.password".to_string(), "hunter2".to_string()),
                ("security.protocol".to_string(), "SASL_SSL".to_string()),
            ]
        );
        let refused = from_environment(vars(&[("EDOW_KAFKA_ENABLE_AUTO_COMMIT", "true")]))
            .unwrap_err()
            .to_string();
        assert!(refused.contains("enable.auto.commit"), "{refused}");
    }

    #[test]
    fn properties_files_read_as_java_clients_read_them() {
        let path = Path::new("client.properties");
        let text = "# comment\n! also a comment\n\nsecurity.protocol = SSL\nssl.ca.location=/ca.pem\nsasl.jaas: x\n";
        let settings = parse_properties(text, path).unwrap();
        assert_eq!(settings[0], ("security.protocol".into(), "SSL".into()));
        assert_eq!(settings[1], ("ssl.ca.location".into(), "/ca.pem".into()));
        assert_eq!(settings.len(), 3);
        let err = parse_properties("just words\n", path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1"), "{err}");
        let err = parse_properties("acks=1\n", path).unwrap_err().to_string();
        assert!(err.contains("acks"), "{err}");
    }

    #[test]
    fn flags_take_no_secret_and_no_fixed_setting() {
        assert_eq!(
            parse_flag_option(" linger.ms = 0 ").unwrap(),
            ("linger.ms".to_string(), "0".to_string())
        );
        assert_eq!(parse_flag_option("").unwrap().0, "");
        assert!(parse_flag_option("linger.ms").is_err());
        assert!(parse_flag_option("=5").is_err());
        assert!(parse_flag_option("acks=1").is_err());
        let secret = parse_flag_option("sasl.password=hunter2").unwrap();
        let refused = gather(None, &[secret]).unwrap_err().to_string();
        assert!(
            refused.contains("EDOW_KAFKA_SASL_PASSWORD") && !refused.contains("hunter2"),
            "{refused}"
        );
        for key in [
            "ssl.key.password",
            "sasl.oauthbearer.client.secret",
            "ssl.key.pem",
        ] {
            assert!(gather(None, &[(key.into(), "x".into())]).is_err(), "{key}");
        }
    }

    #[test]
    fn java_only_and_guarantee_settings_are_refused_naming_what_to_write() {
        let path = Path::new("client.properties");
        let err = parse_properties(
            "sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required password=\"pw\";\n",
            path,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("sasl.username") && !err.contains("pw"),
            "{err}"
        );
        // The same through a flag: refused when gathered, never by the parser (which would print the value).
        let jaas = parse_flag_option("sasl.jaas.config=required password=\"pw\"").unwrap();
        let err = gather(None, &[jaas]).unwrap_err().to_string();
        assert!(!err.contains("pw\""), "{err}");
        for key in [
            "auto.offset.reset",
            "metadata.broker.list",
            "request.required.acks",
            "group.instance.id",
        ] {
            assert!(parse_flag_option(&format!("{key}=x")).is_err(), "{key}");
        }
        let scrubbed = scrub(
            "Client config error: bad value sasl.password hunter2",
            &[("sasl.password".into(), "hunter2".into())],
        );
        assert!(!scrubbed.contains("hunter2"), "{scrubbed}");
    }

    #[test]
    fn secrets_are_never_shown() {
        let shown = redacted(&[
            ("sasl.password".into(), "hunter2".into()),
            ("sasl.username".into(), "edow".into()),
        ]);
        assert_eq!(shown[0].1, "***");
        assert_eq!(shown[1].1, "edow");
        let args = KafkaArgs {
            kafka_options: vec![("ssl.key.password".into(), "pw".into())],
            kafka_config: None,
        };
        assert!(!format!("{args:?}").contains("pw\""));
    }
}
