//! The RSA keys uplink signs PowerSync tokens with, and the JWKS that publishes their public
//! halves.
//!
//! Keys load from either encoding in use: base64 of a JWK JSON object (what CloudCode's
//! `generate_keys` and the PowerSync Node demo print, with `alg: RS256` and
//! `kid: powersync-<hex>`) or PEM (PKCS#1 or PKCS#8 private keys; SPKI or PKCS#1 public keys).

use std::fmt;

use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::{DecodingKey, EncodingKey};
use rand::RngCore;
use rsa::pkcs1::{DecodeRsaPrivateKey, DecodeRsaPublicKey, EncodeRsaPrivateKey};
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::traits::{PrivateKeyParts, PublicKeyParts};
use rsa::{BigUint, RsaPrivateKey, RsaPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not a PEM key, nor base64 of a JWK JSON object")]
    UnknownEncoding,
    #[error("the JWK is not usable: {0}")]
    BadJwk(String),
    #[error("the PEM key is not usable: {0}")]
    BadPem(String),
    #[error("RSA keys must have at least {MIN_RSA_BITS} bits, this one has {0}")]
    TooShort(usize),
    #[error("the public key does not match the private key")]
    Mismatch,
}

/// A public key as published in the JWKS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicJwk {
    pub kty: String,
    pub n: String,
    pub e: String,
    pub alg: String,
    pub kid: String,
    #[serde(rename = "use")]
    pub use_: String,
}

/// The JWK JSON fields uplink reads and writes (private fields optional).
#[derive(Clone, Default, Deserialize, Serialize)]
struct JwkJson {
    kty: String,
    n: String,
    e: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    d: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    p: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    q: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dq: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    qi: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    alg: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
}

/// A key that verifies tokens (the current signing key's public half, or a previous one).
#[derive(Clone)]
pub struct VerifyingKey {
    pub kid: String,
    pub public: RsaPublicKey,
    pub decoding: DecodingKey,
}

impl VerifyingKey {
    pub fn new(kid: String, public: RsaPublicKey) -> Result<Self, KeyError> {
        check_size(&public)?;
        let decoding = DecodingKey::from_rsa_raw_components(&public.n().to_bytes_be(), &public.e().to_bytes_be());
        Ok(Self { kid, public, decoding })
    }

    /// Loads a public key (base64 JWK or PEM). A PEM key carries no kid, so one is derived.
    pub fn parse(encoded: &str) -> Result<Self, KeyError> {
        match decode_encoding(encoded)? {
            Encoded::Jwk(jwk) => {
                let public = jwk_public(&jwk)?;
                let kid = jwk.kid.clone().unwrap_or_else(|| derived_kid(&public));
                Self::new(kid, public)
            }
            Encoded::Pem(pem) => {
                let public = RsaPublicKey::from_public_key_pem(&pem)
                    .or_else(|_| RsaPublicKey::from_pkcs1_pem(&pem))
                    .or_else(|_| {
                        // A private key PEM also yields its public half.
                        parse_private_pem(&pem).map(|k| k.to_public_key())
                    })
                    .map_err(|e| KeyError::BadPem(e.to_string()))?;
                Self::new(derived_kid(&public), public)
            }
        }
    }

    pub fn jwk(&self) -> PublicJwk {
        PublicJwk {
            kty: "RSA".into(),
            n: b64url(&self.public.n().to_bytes_be()),
            e: b64url(&self.public.e().to_bytes_be()),
            alg: "RS256".into(),
            kid: self.kid.clone(),
            use_: "sig".into(),
        }
    }
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// The current signing key. Its private half never appears in `Debug` output.
#[derive(Clone)]
pub struct SigningKey {
    pub kid: String,
    private: RsaPrivateKey,
    encoding: EncodingKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("private", &"[redacted]")
            .finish()
    }
}

impl SigningKey {
    fn new(kid: String, private: RsaPrivateKey) -> Result<Self, KeyError> {
        check_size(&private.to_public_key())?;
        let der = private.to_pkcs1_der().map_err(|e| KeyError::BadPem(e.to_string()))?;
        let encoding = EncodingKey::from_rsa_der(der.as_bytes());
        Ok(Self { kid, private, encoding })
    }

    /// A fresh key pair with a `powersync-<hex>` kid, as CloudCode's `generate_keys` makes.
    pub fn generate(bits: usize) -> Result<Self, KeyError> {
        let mut rng = rand::thread_rng();
        let private =
            RsaPrivateKey::new(&mut rng, bits.max(MIN_RSA_BITS)).map_err(|e| KeyError::BadPem(e.to_string()))?;
        let mut suffix = [0u8; 5];
        rng.fill_bytes(&mut suffix);
        Self::new(format!("powersync-{}", hex::encode(suffix)), private)
    }

    /// Loads a private key (base64 JWK or PEM).
    pub fn parse(encoded: &str) -> Result<Self, KeyError> {
        match decode_encoding(encoded)? {
            Encoded::Jwk(jwk) => {
                let private = jwk_private(&jwk)?;
                let kid = jwk.kid.clone().unwrap_or_else(|| derived_kid(&private.to_public_key()));
                Self::new(kid, private)
            }
            Encoded::Pem(pem) => {
                let private = parse_private_pem(&pem).map_err(|e| KeyError::BadPem(e.to_string()))?;
                let kid = derived_kid(&private.to_public_key());
                Self::new(kid, private)
            }
        }
    }

    pub fn encoding_key(&self) -> &EncodingKey {
        &self.encoding
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        let public = self.private.to_public_key();
        let decoding = DecodingKey::from_rsa_raw_components(&public.n().to_bytes_be(), &public.e().to_bytes_be());
        VerifyingKey {
            kid: self.kid.clone(),
            public,
            decoding,
        }
    }

    /// `POWERSYNC_PRIVATE_KEY` in the CloudCode / Node-demo format: base64 of the JWK JSON.
    pub fn private_env_value(&self) -> String {
        let k = &self.private;
        let primes = k.primes();
        let jwk = JwkJson {
            kty: "RSA".into(),
            n: b64url(&k.n().to_bytes_be()),
            e: b64url(&k.e().to_bytes_be()),
            d: Some(b64url(&k.d().to_bytes_be())),
            p: primes.first().map(|p| b64url(&p.to_bytes_be())),
            q: primes.get(1).map(|q| b64url(&q.to_bytes_be())),
            dp: k.dp().map(|v| b64url(&v.to_bytes_be())),
            dq: k.dq().map(|v| b64url(&v.to_bytes_be())),
            qi: k.crt_coefficient().map(|v| b64url(&v.to_bytes_be())),
            alg: Some("RS256".into()),
            kid: Some(self.kid.clone()),
        };
        STANDARD.encode(serde_json::to_vec(&jwk).unwrap_or_default())
    }

    /// `POWERSYNC_PUBLIC_KEY` in the same format.
    pub fn public_env_value(&self) -> String {
        let jwk = self.verifying_key().jwk();
        STANDARD.encode(serde_json::to_vec(&jwk).unwrap_or_default())
    }
}

enum Encoded {
    Jwk(Box<JwkJson>),
    Pem(String),
}

fn decode_encoding(encoded: &str) -> Result<Encoded, KeyError> {
    let trimmed = encoded.trim();
    if trimmed.starts_with("-----BEGIN") {
        return Ok(Encoded::Pem(trimmed.replace("\\n", "\n")));
    }
    if trimmed.starts_with('{') {
        return serde_json::from_str(trimmed)
            .map(|jwk| Encoded::Jwk(Box::new(jwk)))
            .map_err(|e| KeyError::BadJwk(e.to_string()));
    }
    let compact: String = trimmed.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes = STANDARD
        .decode(&compact)
        .or_else(|_| URL_SAFE.decode(&compact))
        .or_else(|_| URL_SAFE_NO_PAD.decode(compact.trim_end_matches('=')))
        .map_err(|_| KeyError::UnknownEncoding)?;
    let text = String::from_utf8(bytes).map_err(|_| KeyError::UnknownEncoding)?;
    let text = text.trim();
    if text.starts_with("-----BEGIN") {
        Ok(Encoded::Pem(text.to_owned()))
    } else if text.starts_with('{') {
        serde_json::from_str(text)
            .map(|jwk| Encoded::Jwk(Box::new(jwk)))
            .map_err(|e| KeyError::BadJwk(e.to_string()))
    } else {
        Err(KeyError::UnknownEncoding)
    }
}

fn parse_private_pem(pem: &str) -> Result<RsaPrivateKey, String> {
    RsaPrivateKey::from_pkcs8_pem(pem)
        .or_else(|_| RsaPrivateKey::from_pkcs1_pem(pem))
        .map_err(|e| e.to_string())
}

fn jwk_public(jwk: &JwkJson) -> Result<RsaPublicKey, KeyError> {
    if jwk.kty != "RSA" {
        return Err(KeyError::BadJwk(format!("kty is {:?}, expected \"RSA\"", jwk.kty)));
    }
    if let Some(alg) = &jwk.alg {
        if alg != "RS256" {
            return Err(KeyError::BadJwk(format!("alg is {alg:?}, expected \"RS256\"")));
        }
    }
    RsaPublicKey::new(big(&jwk.n, "n")?, big(&jwk.e, "e")?).map_err(|e| KeyError::BadJwk(e.to_string()))
}

fn jwk_private(jwk: &JwkJson) -> Result<RsaPrivateKey, KeyError> {
    let public = jwk_public(jwk)?;
    let d = jwk
        .d
        .as_deref()
        .ok_or_else(|| KeyError::BadJwk("`d` is missing: this is a public key".into()))?;
    let primes = match (&jwk.p, &jwk.q) {
        (Some(p), Some(q)) => vec![big(p, "p")?, big(q, "q")?],
        _ => Vec::new(),
    };
    let key = RsaPrivateKey::from_components(public.n().clone(), public.e().clone(), big(d, "d")?, primes)
        .map_err(|e| KeyError::BadJwk(e.to_string()))?;
    key.validate().map_err(|e| KeyError::BadJwk(e.to_string()))?;
    Ok(key)
}

fn big(b64: &str, field: &str) -> Result<BigUint, KeyError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(b64.trim_end_matches('='))
        .map_err(|e| KeyError::BadJwk(format!("`{field}` is not base64url: {e}")))?;
    Ok(BigUint::from_bytes_be(&bytes))
}

fn check_size(public: &RsaPublicKey) -> Result<(), KeyError> {
    let bits = public.n().bits();
    if bits < MIN_RSA_BITS {
        return Err(KeyError::TooShort(bits));
    }
    Ok(())
}

/// A kid for keys that come without one (PEM): stable across replicas and restarts.
fn derived_kid(public: &RsaPublicKey) -> String {
    let digest = Sha256::digest(public.n().to_bytes_be());
    format!("powersync-{}", hex::encode(&digest[..5]))
}

pub(crate) fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Every key the api knows: the one it signs with and the public keys it still accepts.
#[derive(Clone, Debug)]
pub struct KeySet {
    pub signing: SigningKey,
    /// Previous public keys still listed in the JWKS and accepted on `/upload` during rotation.
    pub previous: Vec<VerifyingKey>,
}

impl KeySet {
    /// Builds the set, checking that an explicitly given public key matches the private key.
    pub fn new(
        signing: SigningKey,
        public: Option<VerifyingKey>,
        previous: Vec<VerifyingKey>,
    ) -> Result<Self, KeyError> {
        if let Some(public) = public {
            if public.public != signing.verifying_key().public {
                return Err(KeyError::Mismatch);
            }
        }
        let previous = previous.into_iter().filter(|k| k.kid != signing.kid).collect();
        Ok(Self { signing, previous })
    }

    /// All keys that currently verify tokens, signing key first.
    pub fn verifying_keys(&self) -> Vec<VerifyingKey> {
        std::iter::once(self.signing.verifying_key())
            .chain(self.previous.iter().cloned())
            .collect()
    }

    pub fn jwks(&self) -> Vec<PublicJwk> {
        self.verifying_keys().iter().map(VerifyingKey::jwk).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsa::pkcs1::EncodeRsaPublicKey;
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};

    fn key() -> SigningKey {
        SigningKey::generate(2048).expect("generates")
    }

    #[test]
    fn generated_keys_round_trip_through_their_env_values() {
        let k = key();
        assert!(
            k.kid.starts_with("powersync-") && k.kid.len() == "powersync-".len() + 10,
            "{}",
            k.kid
        );
        let again = SigningKey::parse(&k.private_env_value()).expect("loads");
        assert_eq!(again.kid, k.kid);
        assert_eq!(again.verifying_key().public, k.verifying_key().public);
        let public = VerifyingKey::parse(&k.public_env_value()).expect("loads");
        assert_eq!(public.kid, k.kid);
        assert_eq!(public.jwk(), k.verifying_key().jwk());
        let decoded = STANDARD.decode(k.private_env_value()).expect("base64");
        let json: serde_json::Value = serde_json::from_slice(&decoded).expect("json");
        assert_eq!(json["alg"], "RS256");
        assert_eq!(json["kty"], "RSA");
    }

    #[test]
    fn pem_keys_load_in_pkcs1_and_pkcs8() {
        let k = key();
        let pkcs8 = k.private.to_pkcs8_pem(LineEnding::LF).expect("pem");
        let pkcs1 = k.private.to_pkcs1_pem(LineEnding::LF).expect("pem");
        let a = SigningKey::parse(&pkcs8).expect("pkcs8 loads");
        let b = SigningKey::parse(&pkcs1).expect("pkcs1 loads");
        assert_eq!(a.kid, b.kid);
        assert_eq!(a.verifying_key().public, k.verifying_key().public);
        // Base64 of a PEM, as some secret stores hold it, loads too.
        let c = SigningKey::parse(&STANDARD.encode(pkcs1.as_bytes())).expect("b64 pem loads");
        assert_eq!(c.kid, a.kid);
        let public = k.private.to_public_key();
        let spki = public.to_public_key_pem(LineEnding::LF).expect("pem");
        let p1 = public.to_pkcs1_pem(LineEnding::LF).expect("pem");
        assert_eq!(VerifyingKey::parse(&spki).expect("spki").kid, a.kid);
        assert_eq!(VerifyingKey::parse(&p1).expect("pkcs1").kid, a.kid);
    }

    #[test]
    fn a_mismatched_public_key_is_refused() {
        let a = key();
        let b = key();
        let err = KeySet::new(a, Some(b.verifying_key()), vec![]).expect_err("mismatch");
        assert!(matches!(err, KeyError::Mismatch));
    }

    #[test]
    fn garbage_and_short_keys_are_refused_with_a_reason() {
        assert!(matches!(SigningKey::parse("not a key"), Err(KeyError::UnknownEncoding)));
        let public_only = key().public_env_value();
        assert!(matches!(SigningKey::parse(&public_only), Err(KeyError::BadJwk(_))));
        let short = RsaPrivateKey::new(&mut rand::thread_rng(), 1024).expect("short key");
        let pem = short.to_pkcs8_pem(LineEnding::LF).expect("pem");
        assert!(matches!(SigningKey::parse(&pem), Err(KeyError::TooShort(1024))));
    }

    #[test]
    fn debug_output_hides_the_private_key() {
        let k = key();
        let shown = format!("{k:?}");
        assert!(shown.contains(&k.kid));
        let d = b64url(&k.private.d().to_bytes_be());
        assert!(!shown.contains(&d[..20]));
        assert!(!shown.contains("BigUint"));
    }
}
