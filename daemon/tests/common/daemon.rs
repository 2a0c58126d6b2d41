//! A real `rlaifd serve` process for tests: started on a test database with the bundled model and a config the
//! test extends, with HTTP and control-socket helpers. `RLAIFD_TEST_BIN` runs another build of the binary (an
//! older commit's, to show a regression test fails there).

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The rlaifd binary under test.
pub fn bin() -> PathBuf {
    std::env::var_os("RLAIFD_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_rlaifd")))
}

pub fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/shapes-base")
}

pub fn rlaifd(args: &[&str]) -> std::process::Output {
    let o = Command::new(bin()).args(args).output().unwrap();
    assert!(o.status.success(), "rlaifd {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    o
}

pub struct Daemon {
    pub child: Child,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub addr: String,
    pub socket: PathBuf,
}

/// The tests' configuration: a loopback server on a free port, the bundled model, small loop settings;
/// `server_extra` adds `[server]` keys (and sections after them).
pub fn config_text(dir: &Path, db_url: &str, server_extra: &str) -> String {
    format!(
        "[database]\nurl = \"{db_url}\"\n[model]\npath = \"{}\"\n[state]\ndir = \"{}\"\n[server]\nbind = \"127.0.0.1:0\"\nmax_body_bytes = 65536\nmax_image_side = 256\n{server_extra}\n\
         [daemon]\nauto_iterate = false\npoll_s = 0.2\n[loop]\nn = 4\nmax_new_tokens = 24\nprompts_per_iteration = 6\npairs_per_iteration = 1\neval_count = 4\nepochs = 1\nbatch_size = 2\npromote_margin = -1.0\nmax_cover_drop = 1.0\n",
        model().display(),
        dir.join("state").display()
    )
}

impl Daemon {
    /// `server_extra`: more `[server]` keys (and sections after them).
    pub fn start(dir: &Path, db_url: &str, server_extra: &str) -> Daemon {
        Self::start_with(dir, db_url, server_extra, &[])
    }

    /// `start` with more environment variables for the daemon.
    pub fn start_with(dir: &Path, db_url: &str, server_extra: &str, env: &[(&str, &str)]) -> Daemon {
        Self::launch(dir, &config_text(dir, db_url, server_extra), env)
    }

    /// Starts `rlaifd serve` on the configuration `text` (written to DIR/rlaifd.toml) and waits until it listens.
    pub fn launch(dir: &Path, text: &str, env: &[(&str, &str)]) -> Daemon {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("rlaifd.toml");
        std::fs::write(&config, text).unwrap();
        // A killed predecessor's address file and socket would look like this daemon being up.
        let _ = std::fs::remove_file(dir.join("state/server.addr"));
        let _ = std::fs::remove_file(dir.join("state/control.sock"));
        let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
        let child = Command::new(bin())
            .args(["serve", "--config"])
            .arg(&config)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let d = Daemon {
            child,
            dir: dir.to_path_buf(),
            config,
            addr: String::new(),
            socket: dir.join("state/control.sock"),
        };
        d.up(&dir.join("state/server.addr")).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits until the daemon wrote its bound address to `addr_file` and its control socket exists. Err: it
    /// exited first (with its log).
    fn up(mut self, addr_file: &Path) -> Result<Daemon, String> {
        let t0 = Instant::now();
        loop {
            if let Ok(a) = std::fs::read_to_string(addr_file) {
                if self.socket.exists() {
                    self.addr = a.trim().to_string();
                    return Ok(self);
                }
            }
            if let Ok(Some(s)) = self.child.try_wait() {
                return Err(format!("rlaifd serve exited with {s}: {}", self.log()));
            }
            assert!(t0.elapsed() < Duration::from_secs(90), "the daemon did not come up: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `launch`, with the daemon's state directory (`DIR/state`) on a tmpfs only the daemon sees: it runs in a
    /// mount namespace of its own (`unshare --mount`), as a daemon on another host would, so no other daemon and
    /// not the test can read its files. `text` must put control.socket outside the state directory (an absolute
    /// path); the bound address is read through /proc/PID/root. Err: this machine cannot make the namespace.
    pub fn launch_private(dir: &Path, text: &str, env: &[(&str, &str)]) -> Result<Daemon, String> {
        let state = dir.join("state");
        std::fs::create_dir_all(&state).unwrap();
        let config = dir.join("rlaifd.toml");
        std::fs::write(&config, text).unwrap();
        let socket = dir.join("control.sock");
        let _ = std::fs::remove_file(&socket);
        let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg("mount -t tmpfs -o size=256m,mode=0700 rlaifd-private \"$0\" && exec \"$@\"")
            .arg(&state)
            .arg(bin())
            .args(["serve", "--config"])
            .arg(&config)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run unshare: {e}"))?;
        let d = Daemon { child, dir: dir.to_path_buf(), config, addr: String::new(), socket };
        // Its files are visible from here only through its own root.
        let addr_file = PathBuf::from(format!("/proc/{}/root{}", d.child.id(), state.join("server.addr").display()));
        d.up(&addr_file)
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// One request, one connection; returns (status, body).
    pub fn http(&self, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, String) {
        http(&self.addr, method, path, content_type, body)
    }

    pub fn ctl_raw(&self, line: &str) -> Value {
        self.ctl_bytes(line.as_bytes())
    }

    /// One control line of any bytes (a newline is added); the reply.
    pub fn ctl_bytes(&self, line: &[u8]) -> Value {
        let mut s = std::os::unix::net::UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
        s.write_all(line).unwrap();
        s.write_all(b"\n").unwrap();
        let mut reply = String::new();
        BufReader::new(&s).read_line(&mut reply).unwrap();
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply {reply:?}: {e}"))
    }

    pub fn ctl(&self, cmd: Value) -> Value {
        self.ctl_raw(&cmd.to_string())
    }
}

impl Daemon {
    /// A field of /proc/PID/status in KiB (VmRSS: resident now, VmHWM: the peak).
    pub fn mem_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with(&format!("{field}:")))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {field} for the daemon (it died?): {}", self.log()))
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn http(addr: &str, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    s.write_all(head.as_bytes()).unwrap();
    // A server may answer (413) before reading everything: ignore a failed write of the rest.
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return (status, body.to_string());
    }
    // Chunked: hex size line, data, CRLF, ... until the 0 chunk.
    let (mut rest, mut out) = (body, String::new());
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].strip_prefix("\r\n").unwrap_or(&after[n..]);
    }
    (status, out)
}

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn chat_body(image: &[u8], text: &str, extra: Value) -> Vec<u8> {
    chat_request(text, Some(("image/png", image)), extra)
}

/// A chat request: one user message with `text` and, when given, an image as a data URL of its media type; `extra`
/// adds top-level fields.
pub fn chat_request(text: &str, image: Option<(&str, &[u8])>, extra: Value) -> Vec<u8> {
    let mut content = vec![json!({ "type": "text", "text": text })];
    if let Some((mime, bytes)) = image {
        content
            .push(json!({ "type": "image_url", "image_url": { "url": format!("data:{mime};base64,{}", b64(bytes)) } }));
    }
    let mut v = json!({ "model": "rlaifd", "messages": [{ "role": "user", "content": content }] });
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v.to_string().into_bytes()
}

pub async fn counts(pool: &sqlx::PgPool) -> Vec<i64> {
    let mut v = Vec::new();
    for t in ["checkpoints", "iterations", "prompts", "images", "jobs", "pairs"] {
        v.push(sqlx::query_scalar(&format!("SELECT count(*) FROM {t}")).fetch_one(pool).await.unwrap());
    }
    v.push(
        sqlx::query_scalar("SELECT count(*) FROM checkpoints WHERE status = 'promoted'").fetch_one(pool).await.unwrap(),
    );
    v
}

pub fn shapes_png(dir: &Path, seed: &str) -> Vec<u8> {
    let out = dir.join(format!("img-{seed}"));
    rlaifd(&["shapes", "gen", "--seed", seed, "--count", "1", "--out", out.to_str().unwrap()]);
    std::fs::read(out.join("000000.png")).unwrap()
}

pub fn png(w: u32, h: u32) -> Vec<u8> {
    let mut bytes = Vec::new();
    image::RgbImage::from_pixel(w, h, image::Rgb([200, 30, 30]))
        .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .unwrap();
    bytes
}

/// The value of the sample `name` in Prometheus text exposition whose labels include `labels` (in any order).
pub fn prom_sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').map(|(n, r)| (n, r.trim_end_matches('}'))).unwrap_or((series, ""));
        if n != name {
            return None;
        }
        let have: Vec<(&str, &str)> =
            rest.split("\",").filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k, v.trim_matches('"'))).collect();
        labels.iter().all(|want| have.contains(want)).then(|| value.parse().ok())?
    })
}
