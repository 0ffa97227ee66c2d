//! Prompt templates: a `[system]` and a `[user]` section of plain text with `{{field}}` placeholders,
//! read and parsed once when the executor is built, their SHA-256 recorded in the audit trail.

use std::path::Path;

use serde_json::Value;
use sha2::{Digest, Sha256};

/// A parsed `[system]` + `[user]` template.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PromptTemplate {
    system: Vec<Segment>,
    user: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Text(String),
    Field(String),
}

/// A template as loaded from its file.
#[derive(Debug)]
pub(super) struct LoadedTemplate {
    pub template: PromptTemplate,
    /// The path as written in the settings, relative to the executors folder.
    pub path: String,
    /// SHA-256 of the file's bytes, hex.
    pub sha256: String,
}

impl PromptTemplate {
    /// Parses a template file's text. Errors say what is wrong, with line numbers.
    pub(super) fn parse(text: &str) -> Result<Self, String> {
        let mut system: Option<String> = None;
        let mut user: Option<String> = None;
        let mut current: Option<&str> = None;
        let mut body = String::new();
        let mut finish = |section: Option<&str>, body: &mut String| -> Result<(), String> {
            let Some(section) = section else {
                return Ok(());
            };
            let slot = if section == "system" {
                &mut system
            } else {
                &mut user
            };
            if slot.is_some() {
                return Err(format!("the [{section}] section appears twice"));
            }
            *slot = Some(body.trim().to_owned());
            body.clear();
            Ok(())
        };
        for (n, line) in text.lines().enumerate() {
            let header = match line.trim() {
                "[system]" => Some("system"),
                "[user]" => Some("user"),
                _ => None,
            };
            if let Some(section) = header {
                finish(current, &mut body)?;
                current = Some(section);
            } else if current.is_some() {
                body.push_str(line);
                body.push('\n');
            } else if !(line.trim().is_empty() || line.trim_start().starts_with('#')) {
                return Err(format!(
                    "line {}: text before the first section (start with [system])",
                    n + 1
                ));
            }
        }
        finish(current, &mut body)?;
        let section = |name: &str, text: Option<String>| match text {
            None => Err(format!("there is no [{name}] section")),
            Some(t) if t.is_empty() => Err(format!("the [{name}] section is empty")),
            Some(t) => split_placeholders(&t).map_err(|e| format!("[{name}] section: {e}")),
        };
        Ok(Self {
            system: section("system", system)?,
            user: section("user", user)?,
        })
    }

    /// The system and user messages for `payload`.
    pub(super) fn render(&self, payload: &Value) -> (String, String) {
        (render(&self.system, payload), render(&self.user, payload))
    }
}

/// Splits section text into literal text and `{{field}}` placeholders.
fn split_placeholders(text: &str) -> Result<Vec<Segment>, String> {
    let mut segments = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let line = text.len() - rest.len() + start;
        let line = text[..line].matches('\n').count() + 1;
        if start > 0 {
            segments.push(Segment::Text(rest[..start].to_owned()));
        }
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| format!("line {line} of the section: {{{{ is never closed with }}}}"))?;
        let name = after[..end].trim();
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
        if !valid {
            return Err(format!(
                "line {line} of the section: {{{{{}}}}} is not a payload field name (letters, digits, '_', '-')",
                &after[..end]
            ));
        }
        segments.push(Segment::Field(name.to_owned()));
        rest = &after[end + 2..];
    }
    if !rest.is_empty() {
        segments.push(Segment::Text(rest.to_owned()));
    }
    Ok(segments)
}

fn render(segments: &[Segment], payload: &Value) -> String {
    let mut out = String::new();
    for segment in segments {
        match segment {
            Segment::Text(t) => out.push_str(t),
            Segment::Field(name) => match payload.get(name) {
                None => {}
                Some(Value::String(s)) => out.push_str(s),
                Some(other) => out.push_str(&other.to_string()),
            },
        }
    }
    out
}

/// Reads and parses the template once: it, its path as written, and the SHA-256 of its bytes.
pub(super) fn load_template(dir: &Path, relative: &str) -> Result<LoadedTemplate, String> {
    let (text, sha256) = read_prompt_file(dir, relative, "prompt_template")?;
    let template =
        PromptTemplate::parse(&text).map_err(|e| format!("prompt template {relative}: {e}"))?;
    Ok(LoadedTemplate {
        template,
        path: relative.to_owned(),
        sha256,
    })
}

/// A chat-mode executor's system prompt: the file's text without the `#` comment lines that open it.
pub(super) struct SystemPrompt {
    pub text: String,
    pub path: String,
    /// SHA-256 of the file's bytes, comments included (the file as reviewed).
    pub sha256: String,
}

/// Reads a chat-mode executor's `system_prompt` file once.
pub(super) fn load_system_prompt(dir: &Path, relative: &str) -> Result<SystemPrompt, String> {
    let (text, sha256) = read_prompt_file(dir, relative, "system_prompt")?;
    let body: String = text
        .lines()
        .skip_while(|line| line.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let body = body.trim();
    if body.is_empty() {
        return Err(format!("system prompt {relative} is empty"));
    }
    Ok(SystemPrompt {
        text: body.to_owned(),
        path: relative.to_owned(),
        sha256,
    })
}

/// A prompt file relative to the executors folder: its UTF-8 text and the SHA-256 of its bytes.
fn read_prompt_file(dir: &Path, relative: &str, setting: &str) -> Result<(String, String), String> {
    if relative.trim().is_empty() {
        return Err(format!("{setting} must name a file"));
    }
    if Path::new(relative).is_absolute() {
        return Err(format!(
            "{setting} {relative:?} must be relative to the executors folder"
        ));
    }
    let path = dir.join(relative);
    let bytes =
        std::fs::read(&path).map_err(|e| format!("reading {setting} {}: {e}", path.display()))?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let text = String::from_utf8(bytes)
        .map_err(|_| format!("{setting} {} is not UTF-8", path.display()))?;
    Ok((text, sha256))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_template_renders_fields_and_never_rescans_them() {
        let t = PromptTemplate::parse(
            "# comment\n[system]\nSys {{ title }}\n\n[user]\nA={{text}} N={{n}} O={{obj}} M={{missing}}\n",
        )
        .unwrap();
        let payload = json!({"title": "T", "text": "{{title}}", "n": 3, "obj": {"a": [1, 2]}});
        let (system, user) = t.render(&payload);
        assert_eq!(system, "Sys T");
        assert_eq!(user, "A={{title}} N=3 O={\"a\":[1,2]} M=");
    }

    #[test]
    fn malformed_templates_are_refused_with_a_reason() {
        for (text, needle) in [
            ("[user]\nx", "no [system]"),
            ("[system]\nx", "no [user]"),
            ("[system]\n\n[user]\nx", "[system] section is empty"),
            ("[system]\na\n[user]\nb\n[user]\nc", "twice"),
            ("hello\n[system]\na\n[user]\nb", "before the first section"),
            ("[system]\na {{text\n[user]\nb", "never closed"),
            ("[system]\na\n[user]\nb {{a b}}", "not a payload field"),
        ] {
            let err = PromptTemplate::parse(text).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn the_shipped_summarizer_prompt_parses_and_uses_text_and_title() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("executors/prompts/licitacoes.summarize.txt"),
        )
        .unwrap();
        let t = PromptTemplate::parse(&text).unwrap();
        let (system, user) =
            t.render(&json!({"title": "Pregão 12/2026", "text": "Aquisição de papel"}));
        assert!(system.contains("14.133/2021"), "{system}");
        assert!(
            user.contains("Pregão 12/2026") && user.contains("Aquisição de papel"),
            "{user}"
        );
    }
}
