//! Security tests of uplink-api, in-process: authentication of `/token` in every mode and of
//! `/upload`, key rotation, limits, start-up refusals and secret hygiene. One test binary, so
//! the slow RSA key generation in `support` happens once.

mod logs;
mod startup;
mod support;
mod token_endpoint;
mod upload_auth;
