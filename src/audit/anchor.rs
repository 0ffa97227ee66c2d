//! What anchors a chain outside the database: the writer commits to its chain's head in signed
//! checkpoints, and each decision's place in a chain can be proved against one.
//!
//! Each chain is a log in the sense of RFC 6962 and C2SP `tlog-checkpoint`: its leaves are its events'
//! hashes in seq order (leaf `seq - 1` is `SHA-256(0x00 ‖ the event's 32-byte hash)`), and a checkpoint
//! is the note `catraca.audit/<chain_id>\n<size>\n<base64 Merkle root>\n`, signed with Ed25519 as a C2SP
//! `signed-note`. The tree, the proofs and the note are the `tlog_tiles` and `signed_note` crates' own;
//! this module only holds the chain's right edge and names things.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use signed_note::{Note, StandardSigner, StandardVerifier, Verifier, VerifierList};
use tlog_tiles::{Checkpoint, Hash, HashReader};

use crate::config::{Config, KeySource, Mode};

/// Every checkpoint's origin line is this, then the chain's id.
pub const ORIGIN_PREFIX: &str = "catraca.audit/";
/// The extension line of a chain's last checkpoint, signed when its writer stopped: nothing may follow.
const CLOSED_LINE: &str = "closed\n";
/// The name a generated key signs under.
const GENERATED_KEY_NAME: &str = "catraca";
/// Where a generated key is kept, beside (never inside) the audit folder.
const GENERATED_KEY_FILE: &str = "audit-signing.key";
/// The first byte of an encoded C2SP Ed25519 key.
const ALG_ED25519: u8 = 1;

/// Why a key or a checkpoint could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AnchorError {
    #[error("{0}")]
    Key(String),
    #[error("the checkpoint is not a well-formed signed note: {0}")]
    Malformed(String),
    #[error("the checkpoint's signature does not verify with the public key {0}")]
    Signature(String),
    #[error("merkle tree: {0}")]
    Tree(String),
}

fn tree_error(e: tlog_tiles::Error) -> AnchorError {
    AnchorError::Tree(e.to_string())
}

/// The key checkpoints are signed with (a C2SP signed-note Ed25519 signer key) and its public half.
#[derive(Clone)]
pub struct SigningKey {
    signer: StandardSigner,
    public: PublicKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private half.
        f.debug_struct("SigningKey")
            .field("public", &self.public.text)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Reads an encoded signer key, `PRIVATE+KEY+<name>+<id>+<base64>`.
    pub fn from_text(text: &str) -> Result<Self, AnchorError> {
        let text = text.trim();
        let bad =
            |why: &str| AnchorError::Key(format!("the audit signing key is not usable: {why}"));
        let signer = StandardSigner::new(text).map_err(|e| bad(&e.to_string()))?;
        let mut parts = text.splitn(5, '+');
        let (Some(_), Some(_), Some(name), Some(_), Some(key)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad("expected PRIVATE+KEY+<name>+<id>+<key>"));
        };
        let bytes = BASE64.decode(key).map_err(|e| bad(&e.to_string()))?;
        let secret: [u8; 32] = match bytes.split_first() {
            Some((&ALG_ED25519, rest)) => rest.try_into().map_err(|_| bad("not 32 bytes"))?,
            _ => return Err(bad("not an Ed25519 key")),
        };
        let verifying = ed25519_dalek::SigningKey::from_bytes(&secret).verifying_key();
        let public =
            PublicKey::from_text(&signed_note::new_ed25519_verifier_key(name, &verifying))?;
        Ok(Self { signer, public })
    }

    /// A new random key named `name`, encoded.
    pub fn generate(name: &str) -> Result<String, AnchorError> {
        if !signed_note::is_key_name_valid(name) {
            return Err(AnchorError::Key(format!(
                "{name:?} cannot name a key (no spaces, no '+')"
            )));
        }
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| AnchorError::Key(e.to_string()))?;
        let verifying = ed25519_dalek::SigningKey::from_bytes(&secret).verifying_key();
        let mut public = vec![ALG_ED25519];
        public.extend_from_slice(verifying.as_bytes());
        let mut private = vec![ALG_ED25519];
        private.extend_from_slice(&secret);
        Ok(format!(
            "PRIVATE+KEY+{name}+{:08x}+{}",
            signed_note::key_id(name, &public),
            BASE64.encode(private)
        ))
    }

    /// The key's public half, as auditors keep it.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// Signs the checkpoint of `chain_id` at `size` events with tree hash `root`; `closed` marks the
    /// chain's last one. Returns the signed note.
    pub fn sign(
        &self,
        chain_id: &str,
        size: u64,
        root: Hash,
        closed: bool,
    ) -> Result<String, AnchorError> {
        let extension = if closed { CLOSED_LINE } else { "" };
        let body = Checkpoint::new(&format!("{ORIGIN_PREFIX}{chain_id}"), size, root, extension)
            .map_err(|e| AnchorError::Malformed(e.to_string()))?;
        let mut note =
            Note::new(&body.to_bytes(), &[]).map_err(|e| AnchorError::Malformed(e.to_string()))?;
        note.add_sigs(&[&self.signer])
            .map_err(|e| AnchorError::Malformed(e.to_string()))?;
        String::from_utf8(note.to_bytes()).map_err(|e| AnchorError::Malformed(e.to_string()))
    }
}

/// A checkpoint verifier key, `<name>+<id>+<base64>`: what `GET /v1/audit/public-key` serves and
/// what an auditor keeps away from the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    text: String,
}

impl PublicKey {
    pub fn from_text(text: &str) -> Result<Self, AnchorError> {
        let text = text.trim();
        if text.starts_with("PRIVATE+") {
            // Never echoed: it is the signing key itself.
            return Err(AnchorError::Key(
                "this is a private signing key, not its public key: give the public key \
                 (`catraca audit public-key`, or GET /v1/audit/public-key)"
                    .to_owned(),
            ));
        }
        StandardVerifier::new(text)
            .map_err(|e| AnchorError::Key(format!("not a checkpoint public key ({e}): {text}")))?;
        Ok(Self {
            text: text.to_owned(),
        })
    }

    /// The key itself, or a file holding it.
    pub fn from_text_or_file(value: &str) -> Result<Self, AnchorError> {
        if Path::new(value).is_file() {
            let text = std::fs::read_to_string(value)
                .map_err(|e| AnchorError::Key(format!("{value}: {e}")))?;
            return Self::from_text(&text);
        }
        Self::from_text(value)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Opens a signed checkpoint: its signature by this key, then its body.
    pub fn open(&self, note: &str) -> Result<Opened, AnchorError> {
        let verifier = StandardVerifier::new(&self.text)
            .map_err(|e| AnchorError::Key(format!("{e}: {}", self.text)))?;
        let parsed =
            Note::from_bytes(note.as_bytes()).map_err(|e| AnchorError::Malformed(e.to_string()))?;
        let known = VerifierList::new(vec![Box::new(verifier) as Box<dyn Verifier>]);
        parsed
            .verify(&known)
            .map_err(|_| AnchorError::Signature(self.text.clone()))?;
        let body = Checkpoint::from_bytes(parsed.text())
            .map_err(|e| AnchorError::Malformed(e.to_string()))?;
        let chain_id = body
            .origin()
            .strip_prefix(ORIGIN_PREFIX)
            .ok_or_else(|| {
                AnchorError::Malformed(format!("origin {:?} is not a Catraca chain", body.origin()))
            })?
            .to_owned();
        let closed = match body.extension() {
            "" => false,
            CLOSED_LINE => true,
            other => {
                return Err(AnchorError::Malformed(format!(
                    "unknown extension lines {other:?}"
                )));
            }
        };
        Ok(Opened {
            chain_id,
            size: body.size(),
            root: *body.hash(),
            closed,
        })
    }
}

/// A checkpoint whose signature verified.
#[derive(Debug, Clone, PartialEq)]
pub struct Opened {
    pub chain_id: String,
    pub size: u64,
    pub root: Hash,
    /// The chain's writer stopped after it: no event may follow.
    pub closed: bool,
}

/// A stored checkpoint: the signed note and what it is said to be (the note is the truth).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub chain_id: String,
    pub size: i64,
    pub signed_at: String,
    pub note: String,
}

/// A decision's place in the trail, given to the client with its answer: the chain, the seq and the
/// hash of its DECISION event. With a proof (`GET /v1/audit/proofs/{decision_id}`) and the public key,
/// anyone can check, offline, that a signed checkpoint covers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Receipt {
    pub chain_id: String,
    pub seq: i64,
    /// The DECISION event's hash, 64 hex digits.
    pub hash: String,
}

/// The leaf hash of an event: `SHA-256(0x00 ‖ the event's hash)`. `None` when the hash is not 64 hex
/// digits.
pub fn leaf(event_hash: &str) -> Option<Hash> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(event_hash, &mut bytes).ok()?;
    Some(tlog_tiles::record_hash(&bytes))
}

/// The right edge of a chain's Merkle tree: the latest complete subtree of each height, which is all
/// that appending a leaf and computing the root need (O(log n) memory for any length).
#[derive(Debug, Clone, Default)]
pub struct Frontier {
    size: u64,
    /// By height: the subtree's index at that height and its hash.
    right: Vec<Option<(u64, Hash)>>,
}

impl Frontier {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends the next leaf.
    pub fn push(&mut self, leaf: Hash) -> Result<(), AnchorError> {
        let n = self.size;
        let stored =
            tlog_tiles::stored_hashes_for_record_hash(n, leaf, &*self).map_err(tree_error)?;
        let first = tlog_tiles::stored_hash_index(0, n);
        for (index, hash) in (first..).zip(stored) {
            let (level, k) = tlog_tiles::split_stored_hash_index(index);
            let level = usize::from(level);
            if self.right.len() <= level {
                self.right.resize(level + 1, None);
            }
            self.right[level] = Some((k, hash));
        }
        self.size += 1;
        Ok(())
    }

    /// The tree hash of every leaf pushed so far.
    pub fn root(&self) -> Result<Hash, AnchorError> {
        tlog_tiles::tree_hash(self.size, self).map_err(tree_error)
    }
}

impl HashReader for Frontier {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        indexes
            .iter()
            .map(|&index| {
                let (level, k) = tlog_tiles::split_stored_hash_index(index);
                match self.right.get(usize::from(level)) {
                    Some(Some((at, hash))) if *at == k => Ok(*hash),
                    _ => Err(tlog_tiles::Error::IndexesNotInTree),
                }
            })
            .collect()
    }
}

/// The signing key of this configuration: `CATRACA_AUDIT_SIGNING_KEY` (the key, or a file holding
/// it); without it, `dev` and `staging` use (making it the first time) `audit-signing.key` beside the
/// audit folder, and `prod` refuses to start.
pub fn signing_key(config: &Config) -> anyhow::Result<SigningKey> {
    if let Some(value) = config.audit_signing_key.as_ref().map(KeySource::expose) {
        let text = if value.starts_with("PRIVATE+KEY+") {
            value.to_owned()
        } else {
            std::fs::read_to_string(value).map_err(|e| {
                anyhow::anyhow!(
                    "CATRACA_AUDIT_SIGNING_KEY names {value}, which cannot be read: {e}"
                )
            })?
        };
        return Ok(SigningKey::from_text(&text)?);
    }
    if config.mode == Mode::Prod {
        anyhow::bail!(
            "prod mode signs the audit checkpoints with a key of its own: set CATRACA_AUDIT_SIGNING_KEY \
             to a key file (made by `catraca audit keygen`) or to the key"
        );
    }
    let path = generated_key_path(&config.audit_dir);
    Ok(SigningKey::from_text(&read_or_make_key(&path)?)?)
}

/// The signing key this configuration names or (outside `prod`) has generated, without making one:
/// what commands that only read the trail use.
pub fn signing_key_if_any(config: &Config) -> anyhow::Result<Option<SigningKey>> {
    if config.audit_signing_key.is_some() {
        return signing_key(config).map(Some);
    }
    let path = generated_key_path(&config.audit_dir);
    if config.mode == Mode::Prod || !path.is_file() {
        return Ok(None);
    }
    Ok(Some(SigningKey::from_text(&std::fs::read_to_string(
        &path,
    )?)?))
}

/// Makes a key named `name` at `out` (which must not exist), readable by its owner only; returns its
/// public half.
pub fn write_new_key(out: &Path, name: &str) -> anyhow::Result<PublicKey> {
    let text = SigningKey::generate(name)?;
    let key = SigningKey::from_text(&text)?;
    let mut file = open_private(out).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e} (an existing key is never overwritten)",
            out.display()
        )
    })?;
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    Ok(key.public().clone())
}

/// Where `dev` and `staging` keep a generated key: beside the audit folder, so that shipping the folder
/// never ships the key.
pub fn generated_key_path(audit_dir: &Path) -> PathBuf {
    let parent = audit_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    parent.join(GENERATED_KEY_FILE)
}

/// Reads the key at `path`, or makes one there (readable by its owner only). Processes starting at
/// once agree on one key: each writes its own under a temporary name, and the first link wins.
fn read_or_make_key(path: &Path) -> anyhow::Result<String> {
    if let Ok(text) = std::fs::read_to_string(path) {
        return Ok(text);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let temporary = path.with_extension(format!("{}.tmp", std::process::id()));
    let mut file = open_private(&temporary)?;
    file.write_all(SigningKey::generate(GENERATED_KEY_NAME)?.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    drop(file);
    let linked = std::fs::hard_link(&temporary, path);
    let _ = std::fs::remove_file(&temporary);
    match linked {
        Ok(()) => tracing::warn!(
            path = %path.display(),
            "made an audit signing key for this dev/staging setup; prod needs CATRACA_AUDIT_SIGNING_KEY"
        ),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e.into()),
    }
    Ok(std::fs::read_to_string(path)?)
}

fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    options.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_text(&SigningKey::generate("test").unwrap()).unwrap()
    }

    fn hash_of(i: u32) -> String {
        crate::event::chain_hash("", &i.to_string())
    }

    #[test]
    fn the_frontier_root_is_the_rfc_6962_tree_hash() {
        // Against the crate's own storage of every stored hash, for sizes across several heights.
        struct All(Vec<Hash>);
        impl HashReader for All {
            fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
                Ok(indexes.iter().map(|&i| self.0[i as usize]).collect())
            }
        }
        let mut all = All(Vec::new());
        let mut frontier = Frontier::default();
        for i in 0..300u32 {
            let l = leaf(&hash_of(i)).unwrap();
            let stored = tlog_tiles::stored_hashes_for_record_hash(u64::from(i), l, &all).unwrap();
            all.0.extend(stored);
            frontier.push(l).unwrap();
            let want = tlog_tiles::tree_hash(u64::from(i) + 1, &all).unwrap();
            assert_eq!(frontier.root().unwrap(), want, "size {}", i + 1);
        }
    }

    #[test]
    fn a_checkpoint_opens_with_its_key_and_no_other() {
        let k = key();
        let mut f = Frontier::default();
        f.push(leaf(&hash_of(1)).unwrap()).unwrap();
        let note = k.sign("gw.0192", 1, f.root().unwrap(), false).unwrap();
        assert!(note.starts_with("catraca.audit/gw.0192\n1\n"), "{note}");
        let opened = k.public().open(&note).unwrap();
        assert_eq!(
            (opened.chain_id.as_str(), opened.size, opened.closed),
            ("gw.0192", 1, false)
        );
        assert!(matches!(
            key().public().open(&note),
            Err(AnchorError::Signature(_))
        ));
        let closed = k.sign("gw.0192", 1, f.root().unwrap(), true).unwrap();
        assert!(k.public().open(&closed).unwrap().closed);
        let forged = note.replacen("\n1\n", "\n2\n", 1);
        assert!(k.public().open(&forged).is_err());
    }

    #[test]
    fn a_key_round_trips_through_its_text_and_a_bad_one_is_named() {
        let text = SigningKey::generate("catraca").unwrap();
        let k = SigningKey::from_text(&text).unwrap();
        assert!(k.public().as_str().starts_with("catraca+"));
        assert!(!format!("{k:?}").contains("PRIVATE"));
        assert!(SigningKey::from_text("PRIVATE+KEY+x+00000000+AAAA").is_err());
        assert!(PublicKey::from_text("catraca+12345678+AQ==").is_err());
        // A private key given where the public one belongs is refused without being echoed.
        let refused = PublicKey::from_text(&text).unwrap_err().to_string();
        assert!(!refused.contains(&text[12..]), "{refused}");
    }

    #[test]
    fn the_generated_key_lives_beside_the_audit_folder() {
        assert_eq!(
            generated_key_path(Path::new("data/audit")),
            Path::new("data/audit-signing.key")
        );
        assert_eq!(
            generated_key_path(Path::new("audit")),
            Path::new("./audit-signing.key")
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        let first = read_or_make_key(&path).unwrap();
        assert_eq!(read_or_make_key(&path).unwrap(), first);
        SigningKey::from_text(&first).unwrap();
    }
}
