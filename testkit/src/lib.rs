//! Test support that owns real processes: a nisshi broker and the project's own binaries, each on a free
//! loopback port with its own data directory, stopped by pid when dropped — also when a test fails or panics.
//!
//! Every child is spawned from one long-lived thread with `PR_SET_PDEATHSIG = SIGKILL`, so that even a test
//! binary killed outright takes its brokers and binaries with it instead of leaving them running.

use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The workspace root, found from this crate's manifest directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit lives one level below the workspace root")
        .to_path_buf()
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0 to find a free port")
}

/// Path of the nisshi binary, installing it on first use through `scripts/install-broker`
/// (or taken from `EDOW_BROKER_BIN`).
pub fn broker_binary() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Ok(path) = std::env::var("EDOW_BROKER_BIN") {
            return PathBuf::from(path);
        }
        let script = workspace_root().join("scripts/install-broker");
        let out = Command::new(&script)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed; run it by hand to see why",
            script.display()
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        PathBuf::from(
            stdout
                .lines()
                .last()
                .expect("install-broker prints the path")
                .trim(),
        )
    })
    .clone()
}

/// Path of one of the workspace's binaries, built (once per test process) so that a test never runs a stale
/// binary of another package; cargo makes that a no-op when it is up to date.
pub fn workspace_binary(package: &str, name: &str) -> PathBuf {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let exe = std::env::current_exe().expect("current test executable");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let path = profile_dir.join(name);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|b| b == name) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .args(["build", "--quiet", "-p", package, "--bin", name])
            .current_dir(workspace_root());
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            build.arg("--release");
        }
        let status = build.status().expect("running cargo build");
        assert!(
            status.success(),
            "cargo build -p {package} --bin {name} failed"
        );
        built.push(name.to_string());
    }
    path
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `command` from the long-lived spawner thread so that the child dies with the test process.
fn spawn_tied_to_this_process(command: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("edow-testkit-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    // SAFETY: prctl is async-signal-safe; the closure touches nothing else.
                    unsafe {
                        command.pre_exec(|| {
                            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                                return Err(io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("starting the spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    sender
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((command, reply_tx))
        .expect("spawner thread is alive");
    reply_rx.recv().expect("spawner thread replies")
}

/// A child process with its output captured to a log file; killed (SIGKILL) and reaped on drop.
pub struct Process {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    /// Starts `program args` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, program: &Path, args: &[String], cwd: &Path, log: PathBuf) -> Process {
        Process::spawn_with_env(name, program, args, cwd, log, &[])
    }

    /// Like [`Process::spawn`], with extra environment variables.
    pub fn spawn_with_env(
        name: &str,
        program: &Path,
        args: &[String],
        cwd: &Path,
        log: PathBuf,
        env: &[(String, String)],
    ) -> Process {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("opening log {}: {e}", log.display()));
        let err = out.try_clone().expect("cloning log file handle");
        let mut command = Command::new(program);
        command
            .args(args)
            .current_dir(cwd)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = spawn_tied_to_this_process(command)
            .unwrap_or_else(|e| panic!("starting {name} ({}): {e}", program.display()));
        Process {
            name: name.to_string(),
            child: Some(child),
            log,
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// The process's output so far.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// Panics with the process's log if it has exited.
    fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{} exited early with {status}; its log:\n{}",
                    self.name,
                    self.log()
                );
            }
        }
    }

    /// Waits until something accepts TCP connections on `addr`, or panics with the process's log.
    pub fn wait_for_port(&mut self, addr: SocketAddr, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            self.assert_running();
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not listen on {addr} within {timeout:?}; its log:\n{}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits up to `grace` for a clean exit, then SIGKILLs. Returns true on a clean exit.
    pub fn terminate(&mut self, grace: Duration) -> bool {
        let Some(child) = self.child.as_mut() else {
            return true;
        };
        // SAFETY: plain kill(2) on a pid we own and have not reaped yet.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A nisshi broker on a free loopback port, with in-memory storage or durable (sqlite) storage that survives
/// [`Broker::restart`]; or secured ([`Broker::start_secured`]): behind a TLS terminator, requiring SASL, or both.
pub struct Broker {
    process: Process,
    port: u16,
    durable: bool,
    dir: TempDir,
    tls: Option<Tls>,
    /// SCRAM-SHA-512 users (name, password); the broker requires authentication when there are any.
    users: Vec<(String, String)>,
}

/// stunnel in front of the broker: clients reach it only over TLS, since the broker advertises this port.
struct Tls {
    terminator: Process,
    port: u16,
    ca: PathBuf,
}

impl Broker {
    /// A broker with in-memory storage.
    pub fn start() -> Broker {
        Broker::start_with_storage(false)
    }

    /// A broker storing everything in sqlite in its own directory: records, offsets and compaction survive a
    /// restart.
    pub fn start_durable() -> Broker {
        Broker::start_with_storage(true)
    }

    fn start_with_storage(durable: bool) -> Broker {
        let dir = tempfile::Builder::new()
            .prefix("edow-broker-")
            .tempdir()
            .expect("creating broker data dir");
        let port = free_port();
        let process = Broker::spawn(port, port, durable, false, dir.path(), 1);
        Broker {
            process,
            port,
            durable,
            dir,
            tls: None,
            users: Vec::new(),
        }
    }

    /// A broker reached only through a TLS terminator (Debian's stunnel4, which scripts/test installs) with a
    /// self-signed certificate for 127.0.0.1, when `tls`; requiring SASL SCRAM-SHA-512 as one of `users`
    /// (name, password), when there are any (then its storage is sqlite, where nisshi keeps users). The broker
    /// advertises the TLS port, so every client, once bootstrapped, connects through it.
    /// [`Broker::client_settings`] and [`Broker::password_of`] are what a client needs.
    pub fn start_secured(tls: bool, users: &[(&str, &str)]) -> Broker {
        let dir = tempfile::Builder::new()
            .prefix("edow-broker-secured-")
            .tempdir()
            .expect("creating broker data dir");
        let (port, tls_port) = (free_port(), free_port());
        let advertised = if tls { tls_port } else { port };
        let durable = !users.is_empty();
        let mut process = Broker::spawn(port, advertised, durable, false, dir.path(), 1);
        if !users.is_empty() {
            // nisshi stores users through its own admin client, which does not authenticate: make them first,
            // then restart the broker requiring authentication.
            for (name, password) in users {
                let made = Command::new(broker_binary())
                    .args(["user", "create", "--broker"])
                    .arg(format!("tcp://127.0.0.1:{port}"))
                    .args([name, password])
                    .output()
                    .expect("running nisshi user create");
                assert!(
                    made.status.success(),
                    "nisshi user create {name}: {}",
                    String::from_utf8_lossy(&made.stderr)
                );
            }
            process.terminate(Duration::from_secs(10));
            process = Broker::spawn(port, advertised, durable, true, dir.path(), 2);
        }
        let tls = tls.then(|| tls_terminator(dir.path(), tls_port, port));
        Broker {
            process,
            port,
            durable,
            dir,
            tls,
            users: users
                .iter()
                .map(|(n, p)| (n.to_string(), p.to_string()))
                .collect(),
        }
    }

    /// The librdkafka settings, secrets aside, that a client needs besides the bootstrap servers: the security
    /// protocol, the test CA, the SASL mechanism; none for a plain broker. With SASL, add `sasl.username` and
    /// `sasl.password` of one of the users ([`Broker::password_of`]).
    pub fn client_settings(&self) -> Vec<(String, String)> {
        let protocol = match (self.tls.is_some(), !self.users.is_empty()) {
            (false, false) => return Vec::new(),
            (true, false) => "SSL",
            (false, true) => "SASL_PLAINTEXT",
            (true, true) => "SASL_SSL",
        };
        let mut settings = vec![("security.protocol".to_string(), protocol.to_string())];
        if let Some(tls) = &self.tls {
            settings.push(("ssl.ca.location".into(), tls.ca.display().to_string()));
        }
        if !self.users.is_empty() {
            settings.push(("sasl.mechanism".into(), "SCRAM-SHA-512".into()));
        }
        settings
    }

    /// The password of SASL user `name`, if the broker has one.
    pub fn password_of(&self, name: &str) -> Option<String> {
        self.users
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.clone())
    }

    /// Whether the broker requires SASL.
    pub fn requires_sasl(&self) -> bool {
        !self.users.is_empty()
    }

    /// What the TLS terminator logged (connections it accepted), if there is one.
    pub fn terminator_log(&self) -> Option<String> {
        self.tls.as_ref().map(|t| t.terminator.log())
    }

    fn spawn(
        port: u16,
        advertised: u16,
        durable: bool,
        authentication: bool,
        dir: &Path,
        run: usize,
    ) -> Process {
        let binary = broker_binary();
        let url = format!("tcp://127.0.0.1:{port}");
        let advertised = format!("tcp://127.0.0.1:{advertised}");
        // The sqlite path is taken relative to the working directory, which is the broker's own directory.
        let storage = if durable {
            "sqlite://broker.db?maintenance_interval=5s"
        } else {
            "memory://nisshi/"
        };
        let mut args = vec![
            "broker".to_string(),
            "--listener-url".into(),
            url.clone(),
            "--advertised-listener-url".into(),
            advertised,
            "--storage-engine".into(),
            storage.into(),
        ];
        if authentication {
            args.push("--authentication".into());
        }
        if binary.to_string_lossy().contains("nisshi-0.8") {
            args.extend(["--group-initial-rebalance-delay".into(), "100ms".into()]);
        }
        let log = dir.join(format!("broker-{run}.log"));
        let mut process = Process::spawn("nisshi broker", &binary, &args, dir, log);
        process.wait_for_port(
            SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(30),
        );
        process
    }

    /// Stops the broker (SIGTERM, then SIGKILL), waits `down`, and starts it again on the same port. Only a
    /// durable broker keeps its data.
    pub fn restart(&mut self, down: Duration) {
        self.process.terminate(Duration::from_secs(10));
        std::thread::sleep(down);
        let runs = std::fs::read_dir(self.dir.path())
            .map(|d| d.count())
            .unwrap_or(0);
        let advertised = self.tls.as_ref().map_or(self.port, |t| t.port);
        self.process = Broker::spawn(
            self.port,
            advertised,
            self.durable,
            self.requires_sasl(),
            self.dir.path(),
            runs + 1,
        );
    }

    /// `host:port` for `bootstrap.servers` (the TLS port behind [`Broker::start_tls`]).
    pub fn bootstrap_servers(&self) -> String {
        format!(
            "127.0.0.1:{}",
            self.tls.as_ref().map_or(self.port, |t| t.port)
        )
    }

    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }
}

/// A new self-signed certificate for 127.0.0.1 and its PKCS#8 key, as PEM files in `dir`.
fn self_signed_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
        ])
        .arg("/CN=localhost")
        .args([
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("running openssl to make a test certificate (scripts/test installs openssl)");
    assert!(
        made.status.success(),
        "openssl could not make a certificate: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    (cert, key)
}

/// A certificate authority of a test's own, issuing server and client certificates (PEM files, PKCS#8 keys)
/// with the `openssl` command.
pub struct TestCa {
    dir: PathBuf,
    pub cert: PathBuf,
    key: PathBuf,
}

impl TestCa {
    /// A new CA named `name`, its files in `dir`.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        let (cert, key) = (
            dir.join(format!("{name}-ca.pem")),
            dir.join(format!("{name}-ca-key.pem")),
        );
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            &format!("/CN={name} test CA"),
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ]);
        TestCa {
            dir: dir.to_path_buf(),
            cert,
            key,
        }
    }

    /// A certificate for `subject` (for example `/CN=dash/O=viewer`) signed by this CA, valid for 127.0.0.1
    /// and localhost; returns its certificate and key files.
    pub fn issue(&self, file_name: &str, subject: &str) -> (PathBuf, PathBuf) {
        let (cert, key, request, extensions) = (
            self.dir.join(format!("{file_name}.pem")),
            self.dir.join(format!("{file_name}-key.pem")),
            self.dir.join(format!("{file_name}.csr")),
            self.dir.join(format!("{file_name}.ext")),
        );
        openssl(&[
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            subject,
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            request.to_str().unwrap(),
        ]);
        std::fs::write(&extensions, "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            request.to_str().unwrap(),
            "-CA",
            self.cert.to_str().unwrap(),
            "-CAkey",
            self.key.to_str().unwrap(),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            extensions.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ]);
        (cert, key)
    }
}

fn openssl(args: &[&str]) {
    let made = Command::new("openssl")
        .args(args)
        .output()
        .expect("running openssl to make a test certificate (scripts/test installs openssl)");
    assert!(
        made.status.success(),
        "openssl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&made.stderr)
    );
}

/// Starts stunnel accepting TLS on `tls_port` for the plain `port`, with a new self-signed certificate for
/// 127.0.0.1 in `dir`.
fn tls_terminator(dir: &Path, tls_port: u16, port: u16) -> Tls {
    let (cert, key) = self_signed_certificate(dir);
    let config = dir.join("stunnel.conf");
    std::fs::write(
        &config,
        format!(
            "foreground = yes\npid =\ndebug = 5\n[kafka]\naccept = 127.0.0.1:{tls_port}\n\
             connect = 127.0.0.1:{port}\ncert = {}\nkey = {}\n",
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let stunnel = ["/usr/bin/stunnel4", "/usr/bin/stunnel"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("stunnel4 is not installed: `apt-get install stunnel4` (scripts/test installs it)");
    let mut terminator = Process::spawn(
        "stunnel",
        &stunnel,
        &[config.display().to_string()],
        dir,
        dir.join("stunnel.log"),
    );
    terminator.wait_for_port(
        SocketAddr::from(([127, 0, 0, 1], tls_port)),
        Duration::from_secs(30),
    );
    Tls {
        terminator,
        port: tls_port,
        ca: cert,
    }
}

/// The SASL user an `edow-registry` connects as, when its broker requires SASL.
pub const REGISTRY_PRINCIPAL: &str = "edow-registry";

/// An `edow-registry` process on a free loopback port, serving once it has read its whole log.
pub struct Registry {
    process: Process,
    port: u16,
    /// The certificate it serves https with ([`Registry::start_secured`]), and the dir of that and its users.
    ca: Option<PathBuf>,
    _secured_dir: Option<TempDir>,
    _dir: TempDir,
}

impl Registry {
    pub fn start(broker: &Broker) -> Registry {
        Registry::start_with(broker, &[])
    }

    /// A registry requiring basic auth as one of `users` (role, name, password), serving https itself with a
    /// certificate of its own ([`Registry::ca`]).
    pub fn start_secured(broker: &Broker, users: &[(&str, &str, &str)]) -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("edow-registry-users-")
            .tempdir()
            .expect("creating a dir for the registry's users");
        let file = dir.path().join("users");
        let lines: String = users
            .iter()
            .map(|(role, name, password)| {
                use sha2::Digest;
                let hash: String = sha2::Sha256::digest(password.as_bytes())
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                format!("{role} {hash} {name}\n")
            })
            .collect();
        std::fs::write(&file, lines).unwrap();
        let (cert, key) = self_signed_certificate(dir.path());
        let mut registry = Registry::start_with(
            broker,
            &[
                "--users",
                file.to_str().unwrap(),
                "--tls-cert",
                cert.to_str().unwrap(),
                "--tls-key",
                key.to_str().unwrap(),
            ],
        );
        registry.ca = Some(cert);
        registry._secured_dir = Some(dir);
        registry
    }

    /// The PEM certificate that a client of a secured registry trusts.
    pub fn ca(&self) -> Option<PathBuf> {
        self.ca.clone()
    }

    /// Starts the registry with extra command-line arguments.
    pub fn start_with(broker: &Broker, extra: &[&str]) -> Registry {
        let binary = workspace_binary("edow-registry", "edow-registry");
        let dir = tempfile::Builder::new()
            .prefix("edow-registry-")
            .tempdir()
            .expect("creating registry dir");
        let port = free_port();
        let mut args = vec![
            "--listen".to_string(),
            format!("127.0.0.1:{port}"),
            "--bootstrap-servers".into(),
            broker.bootstrap_servers(),
        ];
        for (key, value) in broker.client_settings() {
            args.extend(["--kafka-option".into(), format!("{key}={value}")]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        // The registry's own principal; its password in the environment, as secrets must be.
        let mut env = Vec::new();
        if let Some(password) = broker.password_of(REGISTRY_PRINCIPAL) {
            env.push((
                "EDOW_KAFKA_SASL_USERNAME".to_string(),
                REGISTRY_PRINCIPAL.to_string(),
            ));
            env.push(("EDOW_KAFKA_SASL_PASSWORD".to_string(), password));
        }
        let log = dir.path().join("registry.log");
        let mut process =
            Process::spawn_with_env("edow-registry", &binary, &args, dir.path(), log, &env);
        process.wait_for_port(
            SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(60),
        );
        Registry {
            process,
            port,
            ca: None,
            _secured_dir: None,
            _dir: dir,
        }
    }

    /// Base URL, e.g. `http://127.0.0.1:41234` (`https://` through the terminator when secured).
    pub fn url(&self) -> String {
        match &self.ca {
            Some(_) => format!("https://127.0.0.1:{}", self.port),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }

    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }
}

/// One of the workspace's binaries running as a child process, its output in a log file.
pub struct Binary {
    process: Process,
    _dir: TempDir,
}

impl Binary {
    /// Starts `name` from `package` with `args` and extra environment.
    pub fn start(package: &str, name: &str, args: &[String], env: &[(&str, String)]) -> Binary {
        let binary = workspace_binary(package, name);
        let dir = tempfile::Builder::new()
            .prefix(&format!("edow-{name}-"))
            .tempdir()
            .expect("creating a process dir");
        let log = dir.path().join(format!("{name}.log"));
        // The caller's environment comes last, so that it can override the log filter.
        let mut command_env = vec![(
            "RUST_LOG".to_string(),
            std::env::var("EDOW_TEST_LOG").unwrap_or_else(|_| "info".into()),
        )];
        command_env.extend(env.iter().map(|(k, v)| (k.to_string(), v.clone())));
        let process = Process::spawn_with_env(name, &binary, args, dir.path(), log, &command_env);
        Binary { process, _dir: dir }
    }

    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }

    pub fn log(&self) -> String {
        self.process.log()
    }
}
