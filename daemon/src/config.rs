//! The daemon's configuration: `config/default.toml` (embedded) < `/etc/rlaifd/rlaifd.toml` or `--config FILE` <
//! `RLAIFD__SECTION__KEY` environment variables. Unknown keys, wrong types and invalid values are refused at
//! start with the key named.

use crate::rlaif::LoopConfig;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The embedded defaults (the repository's `config/default.toml`).
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");
/// The system-wide file read when no `--config` is given (if it exists).
pub const SYSTEM_FILE: &str = "/etc/rlaifd/rlaifd.toml";

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub database: DatabaseConfig,
    pub model: ModelConfig,
    pub state: StateConfig,
    pub server: ServerConfig,
    pub control: ControlConfig,
    pub daemon: DaemonConfig,
    pub log: LogConfig,
    #[serde(rename = "loop")]
    pub loop_: LoopConfig,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    pub url: String,
    pub max_connections: u32,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub path: PathBuf,
    /// "auto", "cpu", "cuda" or "cuda:N" (`engine::backend::DeviceSpec`).
    pub device: String,
    /// Several devices, one engine each: "auto", "all" or a list of device names; empty: `device` alone.
    pub devices: DeviceList,
}

/// `model.devices`: one word ("auto", "all") or a list of device names.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum DeviceList {
    One(String),
    Many(Vec<String>),
}

impl ModelConfig {
    /// The devices to run engines on: `devices` expanded (`engine::backend::expand_devices`), or `device` alone.
    pub fn device_specs(&self) -> Result<Vec<engine::backend::DeviceSpec>> {
        let names: Vec<String> = match &self.devices {
            DeviceList::One(s) if s.trim().is_empty() => Vec::new(),
            DeviceList::One(s) => vec![s.clone()],
            DeviceList::Many(v) => v.clone(),
        };
        if names.is_empty() {
            return Ok(vec![self.device_spec()?]);
        }
        engine::backend::expand_devices(&names).map_err(|e| anyhow::anyhow!("model.devices: {e}"))
    }

    /// The device `device` names (checked by `Config::validate`).
    pub fn device_spec(&self) -> Result<engine::backend::DeviceSpec> {
        self.device.parse().map_err(|e| anyhow::anyhow!("model.device: {e}"))
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    pub dir: PathBuf,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub bind: String,
    pub token: Secret,
    pub max_body_bytes: usize,
    pub max_image_side: u32,
    pub max_tokens: usize,
    pub max_n: usize,
    pub workers: usize,
    /// Chat requests in flight at once (reading their body, queued or running); more get 503.
    pub max_pending: usize,
    /// Seconds one chat request may take from arrival (queueing included); past it the engine stops it (503).
    pub request_timeout_s: f64,
    /// Most memory one request's model work may take, MiB; 0: half of the memory available at start-up.
    pub max_request_mb: u64,
    /// Answers per engine that decode together in one step (continuous batching); more wait for room.
    pub max_batch: usize,
    /// Hosts whose http(s) image URLs a request may name (exact names, e.g. "images.example.com"); empty: image
    /// URLs are refused, only data URLs are taken.
    pub image_url_hosts: Vec<String>,
    /// Most bytes of one fetched image.
    pub image_url_max_bytes: u64,
    /// Seconds one fetch may take, connecting included.
    pub image_url_timeout_s: f64,
    /// Chat requests per second per client address (token bucket, burst `rate_burst`); 0 disables.
    pub rate_per_s: f64,
    pub rate_burst: f64,
    pub join_prompt_pool: bool,
}

/// A secret (the bearer token): compared and sent, never shown. Debug and Serialize print `<redacted>` (or "" when
/// unset), so `--check-config`, logs and error messages cannot leak it.
#[derive(Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    /// The secret itself, for the comparison that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn shown(&self) -> &'static str {
        if self.0.is_empty() {
            ""
        } else {
            "<redacted>"
        }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.shown())
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.shown())
    }
}

/// Shortest bearer token accepted (characters).
pub const MIN_TOKEN_LEN: usize = 16;

/// The id of the group `name`, looked up through the system's name service (NSS: /etc/group, LDAP, sssd, ...
/// whatever nsswitch.conf names), as `getent group NAME` does.
pub fn group_id(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name).ok().flatten().map(|g| g.gid.as_raw())
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    pub socket: PathBuf,
    pub group: String,
    /// The folder whose files `import-prompts` may read (symlinks resolved); empty: any absolute path the daemon
    /// can read.
    pub import_dir: PathBuf,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    pub auto_iterate: bool,
    pub prompt_source: String,
    pub poll_s: f64,
    pub max_iterations: u64,
    /// What this daemon does: any of "serve" (answer chat requests, follow the promoted checkpoint), "sample",
    /// "label", "train" (start iterations, move them on, train candidates) and "gate". Daemons on many hosts
    /// sharing one database split the work by role; every role is leased in the database, so any number of
    /// daemons may hold each.
    pub roles: Vec<String>,
}

/// The roles `daemon.roles` may name.
pub const ROLES: [&str; 5] = ["serve", "sample", "label", "train", "gate"];

impl DaemonConfig {
    /// Whether this daemon has role `role` (one of [`ROLES`]).
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: String,
    pub level: String,
}

impl Config {
    /// The layered configuration: defaults, then `file` (or the system file when it exists), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Config> {
        Self::load_with_env(file, std::env::vars())
    }

    /// `load` with an explicit environment (tests).
    pub fn load_with_env(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Config> {
        let b = config::Config::builder().add_source(config::File::from_str(DEFAULT_TOML, config::FileFormat::Toml));
        let file = match file {
            Some(f) => {
                if !f.is_file() {
                    bail!("config file {} does not exist (give an existing TOML file to --config)", f.display());
                }
                Some(f.to_path_buf())
            }
            None => Some(PathBuf::from(SYSTEM_FILE)).filter(|p| p.is_file()),
        };
        let mut text = None;
        if let Some(f) = &file {
            text = Some(std::fs::read(f).with_context(|| format!("cannot read config file {}", f.display()))?);
        }
        Self::layered(b, text.as_deref(), file.as_deref(), env)
    }

    /// The defaults overlaid with `bytes` (a TOML document) and no environment: what `--config` with a file of
    /// these bytes gives. The fuzz targets call this.
    pub fn from_toml_bytes(bytes: &[u8]) -> Result<Config> {
        let b = config::Config::builder().add_source(config::File::from_str(DEFAULT_TOML, config::FileFormat::Toml));
        Self::layered(b, Some(bytes), Some(Path::new("<input>")), std::iter::empty())
    }

    fn layered(
        mut b: config::ConfigBuilder<config::builder::DefaultState>,
        text: Option<&[u8]>,
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config> {
        if let (Some(text), Some(f)) = (text, file) {
            // Read it ourselves: the error then names the file, and invalid UTF-8 is caught here.
            let text = std::str::from_utf8(text)
                .map_err(|_| anyhow::anyhow!("config file {} is not UTF-8 text", f.display()))?;
            toml_syntax_check(text).with_context(|| format!("config file {} is not valid TOML", f.display()))?;
            b = b.add_source(config::File::from_str(text, config::FileFormat::Toml));
        }
        let vars: config::Map<String, String> = env.into_iter().filter(|(k, _)| k.starts_with("RLAIFD__")).collect();
        for k in vars.keys() {
            let rest = &k["RLAIFD__".len()..];
            if rest.split("__").count() != 2 {
                bail!("environment variable {k}: expected RLAIFD__SECTION__KEY (e.g. RLAIFD__SERVER__BIND)");
            }
        }
        b = b.add_source(
            config::Environment::with_prefix("RLAIFD")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("daemon.roles")
                .with_list_parse_key("model.devices")
                .source(Some(vars)),
        );
        let merged = b.build().map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
        let cfg: Config = merged.try_deserialize().map_err(|e| {
            anyhow::anyhow!("configuration{}: {e}", file.map(|f| format!(" ({})", f.display())).unwrap_or_default())
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        self.loop_.validate()?;
        self.model.device_spec()?;
        self.model.device_specs()?;
        if self.database.url.trim().is_empty() {
            bail!("database.url is empty (e.g. postgres://postgres@127.0.0.1:5432/rlaifd)");
        }
        if self.database.max_connections == 0 {
            bail!("database.max_connections must be at least 1");
        }
        let addr: std::net::SocketAddr = self.server.bind.parse().map_err(|_| {
            anyhow::anyhow!("server.bind {:?} is not an IP:port address (e.g. 127.0.0.1:8080)", self.server.bind)
        })?;
        let token = self.server.token.expose();
        if !addr.ip().is_loopback() && token.is_empty() {
            bail!("server.bind {} is not a loopback address: set server.token (clients then send Authorization: Bearer TOKEN)", self.server.bind);
        }
        if !token.is_empty() {
            let chars = token.chars().count();
            if chars < MIN_TOKEN_LEN {
                bail!("server.token is {chars} characters long: use at least {MIN_TOKEN_LEN} (e.g. `openssl rand -hex 32`)");
            }
            if token.chars().any(|c| c.is_whitespace() || c.is_control() || !c.is_ascii()) {
                bail!("server.token holds whitespace, control or non-ASCII characters, which an Authorization header cannot carry: use printable ASCII (e.g. `openssl rand -hex 32`)");
            }
        }
        if self.server.max_body_bytes < 1024 {
            bail!("server.max_body_bytes must be at least 1024");
        }
        if self.server.max_image_side < 16 {
            bail!("server.max_image_side must be at least 16");
        }
        if self.server.max_tokens == 0
            || self.server.max_n == 0
            || self.server.workers == 0
            || self.server.max_pending == 0
            || self.server.max_batch == 0
        {
            bail!("server.max_tokens, server.max_n, server.workers, server.max_pending and server.max_batch must be at least 1");
        }
        if !(self.server.image_url_timeout_s.is_finite() && (0.1..=300.0).contains(&self.server.image_url_timeout_s)) {
            bail!("server.image_url_timeout_s must be between 0.1 and 300 seconds");
        }
        if !(1024..=(64 << 20)).contains(&self.server.image_url_max_bytes) {
            bail!("server.image_url_max_bytes must be between 1024 and 67108864 (64 MiB)");
        }
        if let Some(h) = self.server.image_url_hosts.iter().find(|h| {
            h.is_empty() || !h.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        }) {
            bail!("server.image_url_hosts: {h:?} is not a host name or address (e.g. \"images.example.com\")");
        }
        if !(self.server.request_timeout_s.is_finite() && self.server.request_timeout_s >= 0.1) {
            bail!("server.request_timeout_s must be at least 0.1 seconds");
        }
        if !self.control.import_dir.as_os_str().is_empty() && !self.control.import_dir.is_absolute() {
            bail!(
                "control.import_dir {} must be an absolute path (or empty: any absolute path)",
                self.control.import_dir.display()
            );
        }
        if !(self.server.rate_per_s.is_finite()
            && self.server.rate_per_s >= 0.0
            && self.server.rate_burst.is_finite()
            && self.server.rate_burst >= 1.0)
        {
            bail!("server.rate_per_s must be >= 0 (0: no limit) and server.rate_burst >= 1");
        }
        if self.control.socket.as_os_str().is_empty() {
            bail!("control.socket is empty");
        }
        if !self.control.group.is_empty() && group_id(&self.control.group).is_none() {
            bail!(
                "control.group {:?} is not a group of this system (`getent group NAME` lists it when it is; empty: the daemon's own group)",
                self.control.group
            );
        }
        if !matches!(self.daemon.prompt_source.as_str(), "shapes" | "none") {
            bail!("daemon.prompt_source {:?}: expected \"shapes\" or \"none\"", self.daemon.prompt_source);
        }
        if self.daemon.roles.is_empty() {
            bail!("daemon.roles is empty: name at least one of {ROLES:?}");
        }
        for (i, r) in self.daemon.roles.iter().enumerate() {
            if !ROLES.contains(&r.as_str()) {
                bail!("daemon.roles: unknown role {r:?} (expected some of {ROLES:?})");
            }
            if self.daemon.roles[..i].contains(r) {
                bail!("daemon.roles names {r:?} twice");
            }
        }
        if !(self.daemon.poll_s.is_finite() && self.daemon.poll_s >= 0.05) {
            bail!("daemon.poll_s must be at least 0.05 seconds");
        }
        if !matches!(self.log.format.as_str(), "pretty" | "json") {
            bail!("log.format {:?}: expected \"pretty\" or \"json\"", self.log.format);
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| anyhow::anyhow!("log.level {:?}: {e}", self.log.level))?;
        Ok(())
    }

    /// What `--check-config` prints and logs show: the token redacted (`Secret`) and the database URL without its
    /// password.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        c.database.url = crate::db::redacted(&c.database.url);
        c
    }

    /// The control socket's path (relative paths are under the state directory).
    pub fn socket_path(&self) -> PathBuf {
        if self.control.socket.is_absolute() {
            self.control.socket.clone()
        } else {
            self.state.dir.join(&self.control.socket)
        }
    }
}

/// A TOML syntax check with the line of the first error (the `config` crate's message lacks the file).
fn toml_syntax_check(text: &str) -> Result<()> {
    config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(kv: &[(&str, &str)]) -> Vec<(String, String)> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_load_and_match_the_loop_defaults() {
        let c = Config::load_with_env(None, env(&[])).unwrap();
        assert_eq!(c.loop_, LoopConfig::default(), "config/default.toml's [loop] and LoopConfig::default agree");
        assert_eq!(c.server.bind, "127.0.0.1:8080");
    }

    #[test]
    fn layers_file_then_environment_and_errors_name_the_key() {
        let d = std::env::temp_dir().join(format!("rlaifd-config-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let f = d.join("a.toml");
        std::fs::write(&f, "[loop]\nn = 6\n[server]\nmax_n = 4\n").unwrap();
        let c = Config::load_with_env(Some(&f), env(&[("RLAIFD__SERVER__MAX_N", "3"), ("OTHER", "x")])).unwrap();
        assert_eq!((c.loop_.n, c.server.max_n), (6, 3), "file over defaults, environment over file");
        let err = |text: &str, e: &[(&str, &str)]| {
            std::fs::write(&f, text).unwrap();
            format!("{:#}", Config::load_with_env(Some(&f), env(e)).unwrap_err())
        };
        let e = err("[loop]\nnn = 3\n", &[]);
        assert!(e.contains("nn"), "{e}");
        let e = err("[server]\nmax_n = \"many\"\n", &[]);
        assert!(e.contains("max_n"), "{e}");
        let e = err("[loop]\nn = 1\n", &[]);
        assert!(e.contains("loop.n"), "{e}");
        let e = err("[loop\nn = 1\n", &[]);
        assert!(e.contains("a.toml") && e.contains("TOML"), "{e}");
        let e = err("", &[("RLAIFD__SERVER__BIND", "0.0.0.0:80")]);
        assert!(e.contains("server.bind") && e.contains("token"), "{e}");
        let e = err("", &[("RLAIFD__SERVER__MAX_TOKENS", "lots")]);
        assert!(e.contains("max_tokens"), "{e}");
        let e = err("", &[("RLAIFD__BIND", "x")]);
        assert!(e.contains("RLAIFD__BIND"), "{e}");
        std::fs::write(&f, [0xff, 0xfe, b'\n']).unwrap();
        let e = format!("{:#}", Config::load_with_env(Some(&f), env(&[])).unwrap_err());
        assert!(e.contains("UTF-8"), "{e}");
        let e = format!("{:#}", Config::load_with_env(Some(&d.join("missing.toml")), env(&[])).unwrap_err());
        assert!(e.contains("missing.toml"), "{e}");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn request_limits_tokens_and_the_import_folder_are_checked_and_the_token_never_printed() {
        let bad = |kv: &[(&str, &str)]| format!("{:#}", Config::load_with_env(None, env(kv)).unwrap_err());
        assert!(bad(&[("RLAIFD__SERVER__MAX_PENDING", "0")]).contains("server.max_pending"));
        assert!(bad(&[("RLAIFD__SERVER__REQUEST_TIMEOUT_S", "0")]).contains("server.request_timeout_s"));
        assert!(bad(&[("RLAIFD__SERVER__MAX_REQUEST_MB", "-1")]).contains("max_request_mb"));
        assert!(bad(&[("RLAIFD__CONTROL__IMPORT_DIR", "relative/dir")]).contains("control.import_dir"));
        assert!(bad(&[("RLAIFD__SERVER__TOKEN", "short")]).contains("at least 16"));
        assert!(bad(&[("RLAIFD__SERVER__TOKEN", "sixteen chars but spaces")]).contains("whitespace"));
        let token = "0123456789abcdef-secret";
        let c = Config::load_with_env(None, env(&[("RLAIFD__SERVER__TOKEN", token)])).unwrap();
        assert_eq!(c.server.token.expose(), token);
        let shown = format!("{c:?} {}", serde_json::to_string(&c.redacted()).unwrap());
        assert!(!shown.contains(token) && shown.contains("<redacted>"), "{shown}");
    }
}
