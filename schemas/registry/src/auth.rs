//! Who may use the registry: HTTP basic auth against a credentials file of `ROLE SHA256-OF-PASSWORD USERNAME`
//! lines (see `edow-auth`; passwords are 256 random bits, e.g. `edow token new`'s tokens), with two roles:
//! `read` may read subjects, versions, schemas and configuration, look a schema up and check compatibility;
//! `admin` may also register, delete and change configuration. Clients send it the way Confluent's do
//! (`basic.auth.user.info=USER:PASSWORD`). `/healthz` and `/metrics` stay open.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use edow_auth::CredentialFile;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Read,
    Admin,
}

impl Role {
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "read" => Some(Role::Read),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// The registry's users; `None`: anyone may do anything (a loopback listener, or one behind a proxy).
pub type Users = Option<Arc<CredentialFile<Role>>>;

pub fn open(path: &std::path::Path) -> anyhow::Result<Arc<CredentialFile<Role>>> {
    Ok(Arc::new(CredentialFile::open(
        path,
        Role::parse,
        "read, admin",
    )?))
}

/// The role a request needs; `None`: open.
fn needed(method: &Method, path: &str) -> Option<Role> {
    if path == "/healthz" || path == "/metrics" {
        return None;
    }
    if method == Method::GET || method == Method::HEAD {
        return Some(Role::Read);
    }
    // POST /subjects/{subject} looks a schema up; POST /compatibility/... only checks.
    let lookup = method == Method::POST
        && path.starts_with("/subjects/")
        && path.trim_start_matches("/subjects/").split('/').count() == 1;
    if lookup || (method == Method::POST && path.starts_with("/compatibility/")) {
        return Some(Role::Read);
    }
    Some(Role::Admin)
}

fn refusal(status: StatusCode, code: u32, message: &str) -> Response {
    let body = serde_json::json!({"error_code": code, "message": message});
    let mut response = (status, axum::Json(body)).into_response();
    response.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/vnd.schemaregistry.v1+json"),
    );
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            "www-authenticate",
            HeaderValue::from_static("Basic realm=\"edow-registry\""),
        );
    }
    response
}

/// The middleware: 401 (Confluent's 40101) without valid credentials, 403 (40301) for a read-only user's write.
pub async fn authenticate(State(users): State<Users>, request: Request, next: Next) -> Response {
    let (Some(users), Some(role)) = (&users, needed(request.method(), request.uri().path())) else {
        return next.run(request).await;
    };
    let credentials = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Basic ")
                .or_else(|| v.strip_prefix("basic "))
        })
        .filter(|v| v.len() <= 8192)
        .and_then(|v| {
            base64::engine::general_purpose::STANDARD
                .decode(v.trim())
                .ok()
        })
        .and_then(|bytes| String::from_utf8(bytes).ok());
    let Some((user, password)) = credentials.as_deref().and_then(|c| c.split_once(':')) else {
        return refusal(
            StatusCode::UNAUTHORIZED,
            40101,
            "this registry needs basic auth: send the user and password (basic.auth.user.info=USER:PASSWORD)",
        );
    };
    let Some(found) = users.check(user, password) else {
        return refusal(
            StatusCode::UNAUTHORIZED,
            40101,
            "unknown user or wrong password",
        );
    };
    if found.role < role {
        return refusal(
            StatusCode::FORBIDDEN,
            40301,
            &format!("user {user} may only read; registering, deleting and configuring need the admin role"),
        );
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_lookups_and_checks_are_read_the_rest_admin() {
        assert_eq!(needed(&Method::GET, "/subjects"), Some(Role::Read));
        assert_eq!(needed(&Method::POST, "/subjects/a-value"), Some(Role::Read));
        assert_eq!(
            needed(&Method::POST, "/compatibility/subjects/a/versions/latest"),
            Some(Role::Read)
        );
        assert_eq!(
            needed(&Method::POST, "/subjects/a-value/versions"),
            Some(Role::Admin)
        );
        assert_eq!(needed(&Method::DELETE, "/subjects/a"), Some(Role::Admin));
        assert_eq!(needed(&Method::PUT, "/config"), Some(Role::Admin));
        assert_eq!(needed(&Method::GET, "/healthz"), None);
        assert_eq!(needed(&Method::GET, "/metrics"), None);
    }
}
