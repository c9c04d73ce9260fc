//! Everything the api logs while issuing, using and refusing tokens is free of the tokens and
//! secrets themselves.

use std::io::Write;
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use jsonwebtoken::Algorithm;
use serde_json::json;
use tracing_subscriber::fmt::MakeWriter;

use crate::support::*;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
    }
}

// A current-thread runtime keeps the server, the client and every spawned task on this thread,
// where the thread-local subscriber below sees all their events.
#[tokio::test(flavor = "current_thread")]
async fn logs_at_trace_level_contain_no_tokens_and_no_secrets() {
    // Arrange
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let api = spawn_api(with(hs256_env(), &[("UPLINK_TOKEN_ISSUER", "https://uplink.example")])).await;
    let identity = hs256(IDP_HS256_SECRET, Algorithm::HS256, &idp_claims());
    let expired_identity = hs256(
        IDP_HS256_SECRET,
        Algorithm::HS256,
        &patched(idp_claims(), json!({"exp": now() - 3600})),
    );
    let forged_identity = hs256("a-guessed-secret-0123456789abcdef0123", Algorithm::HS256, &idp_claims());

    // Act: issue a token, use it, and get refused in several ways.
    let granted = api.get_token("", Some(&bearer(&identity))).await;
    let issued = granted.body["token"].as_str().expect("token").to_owned();
    let accepted = api.upload(Some(&bearer(&issued)), &one_op_batch()).await;
    let tampered = with_payload(&issued, &json!({"sub": "mallory"}));
    let refused_upload = api.upload(Some(&bearer(&tampered)), &one_op_batch()).await;
    let expired = api.get_token("", Some(&bearer(&expired_identity))).await;
    let forged = api.get_token("", Some(&bearer(&forged_identity))).await;
    let forbidden = api.get_token("?user_id=alice", Some(&bearer(&identity))).await;
    drop(api);
    let logs = captured.text();

    // Assert: the flows happened and were logged ...
    assert_eq!(accepted.status, 503);
    let statuses = [refused_upload.status, expired.status, forged.status, forbidden.status].map(|s| s.as_u16());
    assert_eq!(statuses, [401, 401, 401, 403]);
    assert!(logs.contains("request refused"), "refusals are logged:\n{logs}");
    assert!(logs.contains("ExpiredSignature"), "with their reason:\n{logs}");
    // ... and no credential is in them, whole or as a signature.
    let private_jwk: serde_json::Value =
        serde_json::from_slice(&STANDARD.decode(rsa(0).private_env_value()).expect("base64")).expect("jwk");
    let signature = |t: &str| t.rsplit('.').next().expect("signature").to_owned();
    for (what, secret) in [
        ("the identity token", signature(&identity)),
        ("the expired identity token", signature(&expired_identity)),
        ("the forged identity token", signature(&forged_identity)),
        ("the issued PowerSync token", signature(&issued)),
        ("the HS256 secret", IDP_HS256_SECRET.to_owned()),
        ("the shared secret", SHARED_SECRET.to_owned()),
        (
            "the private key's exponent",
            private_jwk["d"].as_str().expect("d")[..24].to_owned(),
        ),
        (
            "the private key's prime",
            private_jwk["p"].as_str().expect("p")[..24].to_owned(),
        ),
    ] {
        assert!(!logs.contains(&secret), "{what} appears in the logs:\n{logs}");
    }
}
