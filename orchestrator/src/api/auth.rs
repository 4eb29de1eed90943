//! Who may call the API: bearer tokens with roles, and HMAC-signed webhooks.
//!
//! Tokens are kept hashed (SHA-256) in a file, one `ROLE SHA256-HEX [NAME]` per line (a Kubernetes Secret mounts
//! as such a file); `edow token new` makes a token and its line. The file is read again when it changes, so a
//! rotated Secret takes effect without a restart. Roles are ordered: `viewer` reads; `operator` also starts,
//! signals, cancels and replays dead letters; `admin` also deploys definitions and manages schedules.
//!
//! Webhooks carry no token: their senders sign the body with a secret of the hook's own, in GitHub's style
//! (`X-Hub-Signature-256: sha256=HEX`, an HMAC-SHA256 of the body) or Stripe's (`Edow-Signature: t=UNIX,v1=HEX`,
//! an HMAC-SHA256 of `t.body`, refused when `t` is more than five minutes away). The secret of hook `W` is the
//! file `W` of the hook secrets directory. Only the body (and the timestamp) is signed, so a signed delivery's
//! instance id comes from the body alone (its `hook.id` expression over the body, or the body's digest): a
//! replay or a retry, whatever its headers or timestamp, starts nothing new. A hook without a secret takes an
//! operator's token instead while authentication is on, and is refused while it is off but a secrets directory
//! is configured, so that a lost secret file closes the hook instead of opening it.
//!
//! With `--http-tls-client-ca`, the listener takes only clients whose certificate that CA signed (mTLS), and a
//! certificate is a credential of its own: its subject's organizations (`O=`, where Kubernetes puts a client's
//! groups) name its role, its common name the caller. A request with a bearer token is judged by the token when
//! tokens are configured, so a service holding a viewer certificate may still act with an operator's token.
//!
//! `/healthz`, `/readyz`, `/metrics` and `/v1/openapi.json` stay open: probes and scrapers hold no token, and none
//! of them shows a payload (docs/security.md).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use edow_auth::CredentialFile;
use edow_telemetry::http::{ClientCertificate, TlsPeer};

use super::ApiError;

/// What a caller may do; each role may do what the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// The caller of a request that passed authentication, for handlers that record who did something.
#[derive(Debug, Clone)]
pub struct Principal {
    pub name: String,
    pub role: Role,
}

/// Longest token, hook secret or token file line read, in bytes.
const MAX_SECRET_BYTES: usize = 4096;
/// How far a Stripe-style signature's timestamp may be from now.
const SIGNATURE_TOLERANCE: Duration = Duration::from_secs(300);

/// How the API authenticates; cheap to clone.
#[derive(Clone, Default)]
pub struct Auth {
    tokens: Option<Arc<CredentialFile<Role>>>,
    hook_secrets: Option<PathBuf>,
    /// The listener verifies client certificates, so each connection's certificate is a credential.
    client_certificates: bool,
}

/// The verified client certificate of a request's connection, if any: put in every request's extensions by
/// [`authenticate`], for the handlers that authenticate themselves (hooks).
#[derive(Debug, Clone, Default)]
pub struct PeerCertificate(pub Option<ClientCertificate>);

impl Auth {
    /// Authentication by the tokens of `tokens` and, with `client_certificates`, by the roles in verified
    /// client certificates (neither: every request is let through, for a loopback listener or one behind a proxy
    /// that authenticates), and hook signatures by the secrets in `hook_secrets`.
    pub fn new(
        tokens: Option<&Path>,
        hook_secrets: Option<&Path>,
        client_certificates: bool,
    ) -> anyhow::Result<Auth> {
        let tokens = match tokens {
            Some(path) => Some(Arc::new(CredentialFile::open(
                path,
                Role::parse,
                "viewer, operator, admin",
            )?)),
            None => None,
        };
        if let Some(dir) = hook_secrets {
            anyhow::ensure!(
                dir.is_dir(),
                "the hook secrets directory {} is not a directory; give a directory holding one file per hook, \
                 named after its workflow",
                dir.display()
            );
        }
        Ok(Auth {
            tokens,
            hook_secrets: hook_secrets.map(Path::to_path_buf),
            client_certificates,
        })
    }

    pub fn is_on(&self) -> bool {
        self.tokens.is_some() || self.client_certificates
    }

    /// The caller of a request: by its bearer token when tokens are configured and it sends one, else by its
    /// connection's verified certificate; why it is refused otherwise.
    fn principal(
        &self,
        headers: &HeaderMap,
        certificate: Option<&ClientCertificate>,
    ) -> Result<Principal, ApiError> {
        if !self.is_on() {
            return Ok(Principal {
                name: "anonymous".into(),
                role: Role::Admin,
            });
        }
        let value = headers.get("authorization");
        let Some(tokens) = self.tokens.as_ref().filter(|_| value.is_some()) else {
            return match certificate {
                Some(certificate) => certificate_principal(certificate),
                None if self.client_certificates => Err(unauthorized(
                    "this API needs a client certificate signed by its client CA",
                )),
                None => Err(unauthorized(
                    "this API needs a bearer token: send `Authorization: Bearer TOKEN`",
                )),
            };
        };
        let Some(value) = value else {
            return Err(unauthorized(
                "this API needs a bearer token: send `Authorization: Bearer TOKEN`",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty() && t.len() <= MAX_SECRET_BYTES)
            .ok_or_else(|| unauthorized("write the header as `Authorization: Bearer TOKEN`"))?;
        tokens
            .find_secret(token)
            .map(|c| Principal {
                name: c.name,
                role: c.role,
            })
            .ok_or_else(|| {
                unauthorized("this token is not known (revoked, mistyped, or of another cluster)")
            })
    }

    /// The secret of hook `workflow`, if one is configured.
    fn hook_secret(&self, workflow: &str) -> Result<Option<Vec<u8>>, ApiError> {
        let Some(dir) = &self.hook_secrets else {
            return Ok(None);
        };
        // A workflow name from the path must not walk out of the directory: names are `[A-Za-z0-9._-]`, so only
        // `.` and `..` could.
        let safe = !matches!(workflow, "" | "." | "..")
            && workflow
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !safe {
            return Ok(None);
        }
        match read_bounded(&dir.join(workflow)) {
            Ok(secret) => {
                let secret = secret.trim_ascii().to_vec();
                if secret.is_empty() {
                    // An emptied secret must not open the hook.
                    return Err(ApiError::unavailable(format!(
                        "the secret file of hook {workflow} is empty; write the secret into it, or remove it"
                    )));
                }
                Ok(Some(secret))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ApiError::unavailable(format!(
                "reading the secret of hook {workflow}: {e}"
            ))),
        }
    }

    /// Checks a webhook delivery for `workflow`: its signature when the hook has a secret, else (with
    /// authentication on) an operator's token.
    pub fn check_hook(
        &self,
        workflow: &str,
        headers: &HeaderMap,
        certificate: Option<&ClientCertificate>,
        body: &[u8],
    ) -> Result<Delivery, ApiError> {
        match self.hook_secret(workflow)? {
            Some(secret) => {
                verify_signature(&secret, headers, body, SystemTime::now())?;
                // Retries re-sign with a new timestamp: the body, not the signature, is the delivery.
                Ok(Delivery::Signed {
                    body_digest: edow_auth::sha256_hex(body),
                })
            }
            // Hooks are meant to be signed here: one whose secret is missing (a file renamed or deleted) stays
            // closed rather than open.
            None if self.hook_secrets.is_some() && !self.is_on() => Err(unauthorized(format!(
                "hook {workflow} has no secret: put one in the file {workflow} of the hook secrets directory"
            ))),
            None if self.is_on() => {
                let principal = self.principal(headers, certificate).map_err(|_| {
                    unauthorized(format!(
                        "hook {workflow} has no secret, so it needs an operator's bearer token or client \
                         certificate; or give it a secret (a file named {workflow} in the hook secrets \
                         directory) and sign deliveries"
                    ))
                })?;
                require(&principal, Role::Operator).map(|()| Delivery::Trusted)
            }
            None => Ok(Delivery::Trusted),
        }
    }
}

/// How a webhook delivery was let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Signed with the hook's secret. Only the body (and a Stripe-style timestamp) is signed, so nothing else
    /// of the request may choose the instance id: a replay with other headers would start new workflows. The
    /// body's SHA-256 (hex) names a delivery whose definition declares no `hook.id`.
    Signed { body_digest: String },
    /// By an operator's token, or with authentication off.
    Trusted,
}

/// The role a request needs, from its method and path; `None`: open, or checked by its handler (hooks).
fn needed(method: &Method, path: &str) -> Option<Role> {
    if !path.starts_with("/v1/") || path == "/v1/openapi.json" || path.starts_with("/v1/hooks/") {
        return None;
    }
    if method == Method::GET || method == Method::HEAD {
        return Some(Role::Viewer);
    }
    if path == "/v1/definitions" || path == "/v1/schedules" || path.starts_with("/v1/schedules/") {
        return Some(Role::Admin);
    }
    Some(Role::Operator)
}

fn require(principal: &Principal, role: Role) -> Result<(), ApiError> {
    if principal.role >= role {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "Authorization",
        format!(
            "token {} has the role {}; this request needs {} or above",
            principal.name,
            principal.role.name(),
            role.name()
        ),
    ))
}

/// The caller a verified certificate names: the highest role among its subject's organizations.
fn certificate_principal(certificate: &ClientCertificate) -> Result<Principal, ApiError> {
    let name = if certificate.common_name.is_empty() {
        "certificate without a common name".to_string()
    } else {
        format!("CN={}", certificate.common_name)
    };
    match certificate
        .organizations
        .iter()
        .filter_map(|o| Role::parse(o))
        .max()
    {
        Some(role) => Ok(Principal { name, role }),
        None => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "certificate",
            format!(
                "the client certificate {name} names no role: issue it with O=viewer, O=operator or O=admin \
                 in its subject, or send a bearer token"
            ),
        )),
    }
}

fn unauthorized(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "Authorization", message)
}

/// The middleware: refuses a request whose token is missing, unknown (401) or of too small a role (403), and
/// hands the caller to the handlers.
pub async fn authenticate(State(auth): State<Auth>, mut request: Request, next: Next) -> Response {
    let certificate = request
        .extensions()
        .get::<ConnectInfo<TlsPeer>>()
        .and_then(|peer| peer.0.certificate.clone());
    request
        .extensions_mut()
        .insert(PeerCertificate(certificate.clone()));
    let Some(role) = needed(request.method(), request.uri().path()) else {
        return next.run(request).await;
    };
    let checked = auth
        .principal(request.headers(), certificate.as_ref())
        .and_then(|principal| require(&principal, role).map(|()| principal));
    match checked {
        Ok(principal) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Err(refused) => {
            let unauthenticated = refused.status == StatusCode::UNAUTHORIZED;
            let mut response = refused.into_response();
            if unauthenticated {
                response.headers_mut().insert(
                    "www-authenticate",
                    HeaderValue::from_static("Bearer realm=\"edow\""),
                );
            }
            response
        }
    }
}

fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    // A FIFO or a device would block the request; a directory is no secret.
    if !std::fs::metadata(path)?.is_file() {
        return Err(std::io::Error::other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_SECRET_BYTES as u64 + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() > MAX_SECRET_BYTES {
        return Err(std::io::Error::other(format!(
            "{} is over {MAX_SECRET_BYTES} bytes",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Checks a delivery's GitHub- or Stripe-style signature against the hook's secret.
fn verify_signature(
    secret: &[u8],
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> Result<(), ApiError> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(value) = header("x-hub-signature-256") {
        let Some(hex) = value.strip_prefix("sha256=") else {
            return Err(unsigned("X-Hub-Signature-256", "write it as sha256=HEX"));
        };
        if edow_auth::hmac_signed(secret, &[body], hex) {
            return Ok(());
        }
        return Err(unsigned(
            "X-Hub-Signature-256",
            "does not match the body under this hook's secret",
        ));
    }
    if let Some(value) = header("edow-signature") {
        let mut timestamp = None;
        let mut signatures = Vec::new();
        for part in value.split(',') {
            match part.trim().split_once('=') {
                Some(("t", t)) => timestamp = t.parse::<u64>().ok(),
                Some(("v1", s)) => signatures.push(s),
                _ => {}
            }
        }
        let Some(timestamp) = timestamp else {
            return Err(unsigned(
                "Edow-Signature",
                "write it as t=UNIX_SECONDS,v1=HEX",
            ));
        };
        let Some(sent) = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(timestamp)) else {
            return Err(unsigned("Edow-Signature", "its timestamp is not a time"));
        };
        let skew = now
            .duration_since(sent)
            .or_else(|_| sent.duration_since(now))
            .unwrap_or(Duration::MAX);
        if skew > SIGNATURE_TOLERANCE {
            return Err(unsigned(
                "Edow-Signature",
                "its timestamp is more than five minutes away from now (a replayed delivery, or a clock off)",
            ));
        }
        let t = timestamp.to_string();
        if signatures
            .iter()
            .any(|s| edow_auth::hmac_signed(secret, &[t.as_bytes(), b".", body], s))
        {
            return Ok(());
        }
        return Err(unsigned(
            "Edow-Signature",
            "no v1 signature matches `t.body` under this hook's secret",
        ));
    }
    Err(unsigned(
        "X-Hub-Signature-256",
        "this hook needs a signed delivery: X-Hub-Signature-256: sha256=HMAC_SHA256(secret, body) in hex, or \
         Edow-Signature: t=UNIX_SECONDS,v1=HMAC_SHA256(secret, \"t.body\")",
    ))
}

fn unsigned(field: &str, message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, field, message)
}

/// A new random token (256 bits, hex) and its line for the token file.
pub fn new_token(role: Role, name: &str) -> anyhow::Result<(String, String)> {
    let token = edow_auth::new_secret("edow_")?;
    let line = format!(
        "{} {} {name}",
        role.name(),
        edow_auth::sha256_hex(token.as_bytes())
    );
    Ok((token, line))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac_hex(secret: &[u8], parts: &[&[u8]]) -> String {
        use hmac::{Hmac, KeyInit, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
        for p in parts {
            mac.update(p);
        }
        edow_auth::hex(&mac.finalize().into_bytes())
    }

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    fn certificate(common_name: &str, organizations: &[&str]) -> ClientCertificate {
        ClientCertificate {
            common_name: common_name.into(),
            organizations: organizations.iter().map(|o| o.to_string()).collect(),
        }
    }

    #[test]
    fn a_certificate_is_a_credential_under_mtls() {
        let auth = Auth::new(None, None, true).unwrap();
        assert!(auth.is_on());
        let none = HeaderMap::new();
        let ops = certificate("billing", &["Acme", "operator", "viewer"]);
        let caller = auth.principal(&none, Some(&ops)).unwrap();
        assert_eq!(
            (caller.name.as_str(), caller.role),
            ("CN=billing", Role::Operator)
        );
        // Verified but naming no role: authenticated, allowed nothing.
        let refused = auth
            .principal(&none, Some(&certificate("x", &["Acme"])))
            .unwrap_err();
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
        assert!(refused.message.contains("O=viewer"), "{}", refused.message);
        assert_eq!(
            auth.principal(&none, None).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
        // With no tokens configured, a bearer header is no credential: the certificate decides.
        let bearer = headers(&[("authorization", "Bearer whatever".into())]);
        assert_eq!(
            auth.principal(&bearer, Some(&ops)).unwrap().role,
            Role::Operator
        );
    }

    #[test]
    fn a_token_outranks_the_certificate_when_tokens_are_configured() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        let token = edow_auth::new_secret("edow").unwrap();
        let line = format!(
            "admin {} deployer\n",
            edow_auth::sha256_hex(token.as_bytes())
        );
        std::fs::write(&file, line).unwrap();
        let auth = Auth::new(Some(&file), None, true).unwrap();
        let viewer = certificate("dash", &["viewer"]);
        let with_token = headers(&[("authorization", format!("Bearer {token}"))]);
        assert_eq!(
            auth.principal(&with_token, Some(&viewer)).unwrap().role,
            Role::Admin
        );
        assert_eq!(
            auth.principal(&HeaderMap::new(), Some(&viewer))
                .unwrap()
                .role,
            Role::Viewer
        );
        // A wrong token is refused, not quietly replaced by the certificate.
        let wrong = headers(&[("authorization", "Bearer nope".into())]);
        assert_eq!(
            auth.principal(&wrong, Some(&viewer)).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
    }

    #[test]
    fn roles_follow_method_and_path() {
        assert_eq!(needed(&Method::GET, "/v1/workflows"), Some(Role::Viewer));
        assert_eq!(needed(&Method::POST, "/v1/workflows"), Some(Role::Operator));
        assert_eq!(
            needed(&Method::POST, "/v1/workflows/a/cancel"),
            Some(Role::Operator)
        );
        assert_eq!(
            needed(&Method::POST, "/v1/dead-letters/replay"),
            Some(Role::Operator)
        );
        assert_eq!(needed(&Method::POST, "/v1/definitions"), Some(Role::Admin));
        assert_eq!(
            needed(&Method::DELETE, "/v1/schedules/x"),
            Some(Role::Admin)
        );
        assert_eq!(needed(&Method::POST, "/v1/hooks/x"), None);
        assert_eq!(needed(&Method::GET, "/v1/openapi.json"), None);
        assert_eq!(needed(&Method::GET, "/metrics"), None);
        // An unknown write path needs a token before it is told it does not exist.
        assert_eq!(needed(&Method::PUT, "/v1/anything"), Some(Role::Operator));
    }

    #[test]
    fn github_style_signatures_verify_the_body() {
        let body = br#"{"order_id":"A-1"}"#;
        let good = format!("sha256={}", mac_hex(b"s3cret", &[body]));
        let now = SystemTime::now();
        assert!(verify_signature(
            b"s3cret",
            &headers(&[("x-hub-signature-256", good.clone())]),
            body,
            now
        )
        .is_ok());
        let other_body = br#"{"order_id":"A-2"}"#;
        let refused = verify_signature(
            b"s3cret",
            &headers(&[("x-hub-signature-256", good)]),
            other_body,
            now,
        )
        .unwrap_err();
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
        assert!(verify_signature(b"s3cret", &HeaderMap::new(), body, now).is_err());
        let junk = headers(&[("x-hub-signature-256", "sha256=zz".into())]);
        assert!(verify_signature(b"s3cret", &junk, body, now).is_err());
    }

    #[test]
    fn stripe_style_signatures_expire() {
        let body = b"{}";
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let sign = |t: u64| {
            let t_text = t.to_string();
            format!(
                "t={t},v1={}",
                mac_hex(b"k", &[t_text.as_bytes(), b".", body])
            )
        };
        let fresh = headers(&[("edow-signature", sign(1_800_000_000 - 10))]);
        assert!(verify_signature(b"k", &fresh, body, now).is_ok());
        let stale = headers(&[("edow-signature", sign(1_800_000_000 - 600))]);
        assert!(verify_signature(b"k", &stale, body, now).is_err());
        let no_time = headers(&[("edow-signature", "v1=00".into())]);
        assert!(verify_signature(b"k", &no_time, body, now).is_err());
        // A timestamp past what a clock holds is refused, not a panic.
        let huge = headers(&[("edow-signature", format!("t={},v1=00", u64::MAX))]);
        assert!(verify_signature(b"k", &huge, body, now).is_err());
        let future = headers(&[("edow-signature", sign(1_800_000_000 + 600))]);
        assert!(verify_signature(b"k", &future, body, now).is_err());
        let plus = headers(&[("edow-signature", "t=1800000000,v1=+a".to_string())]);
        assert!(verify_signature(b"k", &plus, body, now).is_err());
    }

    #[test]
    fn new_tokens_match_their_line() {
        let (token, line) = new_token(Role::Operator, "deployer").unwrap();
        let tokens = edow_auth::parse(&line, Path::new("t"), Role::parse, "roles").unwrap();
        let found = &tokens[&edow_auth::sha256_hex(token.as_bytes())];
        assert_eq!(
            (found.role, found.name.as_str()),
            (Role::Operator, "deployer")
        );
    }

    #[test]
    fn hook_names_cannot_leave_the_secrets_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("shop"), "k\n").unwrap();
        let auth = Auth::new(None, Some(dir.path()), false).unwrap();
        assert_eq!(auth.hook_secret("shop").unwrap(), Some(b"k".to_vec()));
        for bad in ["../shop", ".", "..", "a/b", ""] {
            assert_eq!(auth.hook_secret(bad).unwrap(), None, "{bad}");
        }
        std::fs::write(dir.path().join(".hidden"), "h").unwrap();
        assert_eq!(auth.hook_secret(".hidden").unwrap(), Some(b"h".to_vec()));
        std::fs::write(dir.path().join("emptied"), " \n").unwrap();
        assert!(
            auth.hook_secret("emptied").is_err(),
            "an emptied secret must not open the hook"
        );
    }
}
