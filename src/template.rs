//! `{column}` placeholders in config values (`name = "{first_name} {last_name}"`).
//!
//! Rule (SPEC "Placeholders and payloads", made precise here and in the README):
//! a value whose placeholders **all** render empty is omitted from the request,
//! so an empty cell never clears data on the platform. When only some render
//! empty, the value is sent with those left out and surrounding whitespace
//! trimmed (`"{first} {last}"` with no last name → `"Ana"`). A value without
//! placeholders is a literal and always sent.

/// One piece of a template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    /// Index into the projected columns of a record (resolved by [`Template::bind`]).
    Column {
        name: String,
        index: usize,
    },
}

/// A parsed config value with `{column}` placeholders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    pub segments: Vec<Segment>,
}

/// A template that does not parse: unbalanced braces or an empty `{}`.
#[derive(Debug, thiserror::Error)]
#[error("{reason} in \"{text}\"")]
pub struct TemplateError {
    pub text: String,
    pub reason: &'static str,
}

impl Template {
    /// Parses `text`. `{{` and `}}` are literal braces.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        let err = |reason| TemplateError {
            text: text.to_owned(),
            reason,
        };
        let mut segments = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some('{') | None => return Err(err("unclosed '{'")),
                            Some(c) => name.push(c),
                        }
                    }
                    let name = name.trim().to_owned();
                    if name.is_empty() {
                        return Err(err("empty placeholder '{}'"));
                    }
                    if !literal.is_empty() {
                        segments.push(Segment::Literal(std::mem::take(&mut literal)));
                    }
                    segments.push(Segment::Column { name, index: 0 });
                }
                '}' => return Err(err("unmatched '}'")),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            segments.push(Segment::Literal(literal));
        }
        Ok(Template { segments })
    }

    /// Column names this template reads, in order of appearance.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Column { name, .. } => Some(name.as_str()),
            Segment::Literal(_) => None,
        })
    }

    /// Resolves each column name to its index among the projected columns.
    pub fn bind(&mut self, index_of: &dyn Fn(&str) -> usize) {
        for segment in &mut self.segments {
            if let Segment::Column { name, index } = segment {
                *index = index_of(name);
            }
        }
    }

    /// Renders into `out` (cleared first) without allocating; `false` when the
    /// value must be omitted (see the module rule). The hot path of payload hashing.
    pub fn render_into<'a>(&self, field: impl Fn(usize) -> &'a str, out: &mut String) -> bool {
        out.clear();
        let mut placeholders = 0;
        let mut empty = 0;
        for segment in &self.segments {
            match segment {
                Segment::Literal(text) => out.push_str(text),
                Segment::Column { index, .. } => {
                    placeholders += 1;
                    let value = crate::record::trim(field(*index));
                    if value.is_empty() {
                        empty += 1;
                    }
                    out.push_str(value);
                }
            }
        }
        if placeholders > 0 && (empty == placeholders || crate::record::trim(out).is_empty()) {
            return false;
        }
        if crate::record::trim(out).len() != out.len() {
            let end = out.trim_end().len();
            out.truncate(end);
            let start = out.len() - out.trim_start().len();
            out.drain(..start);
        }
        true
    }

    /// [`Template::render_into`]'s value, `None` where it returns `false`; a
    /// template that is one placeholder borrows the trimmed cell instead of
    /// copying it into `out` (Weni's checks render 4–5 such templates per row).
    pub fn render_ref<'r: 'b, 'b>(
        &self,
        field: impl Fn(usize) -> &'r str,
        out: &'b mut String,
    ) -> Option<&'b str> {
        if let [Segment::Column { index, .. }] = self.segments.as_slice() {
            let value = crate::record::trim(field(*index));
            return (!value.is_empty()).then_some(value);
        }
        self.render_into(field, out).then_some(out.as_str())
    }

    /// Renders with `field(index)` giving the row's value of a projected column;
    /// `None` when the value must be omitted (see the module rule).
    pub fn render<'a>(&self, field: impl Fn(usize) -> &'a str) -> Option<String> {
        let mut out = String::new();
        self.render_into(field, &mut out).then_some(out)
    }
}

/// Runs `f` with this thread's reusable `String`: payload hashing renders every
/// template of every row, and a fresh `String` each time would allocate per row.
pub fn with_scratch<R>(f: impl FnOnce(&mut String) -> R) -> R {
    thread_local! {
        static SCRATCH: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }
    SCRATCH.with_borrow_mut(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(t: &str, values: &[&str]) -> Option<String> {
        let mut template = Template::parse(t).unwrap();
        let names: Vec<String> = template.columns().map(str::to_owned).collect();
        template.bind(&|name| names.iter().position(|n| n == name).unwrap());
        template.render(|i| values[i])
    }

    #[test]
    fn renders_and_omits() {
        assert_eq!(
            render("{a} {b}", &["Ana", "Silva"]).as_deref(),
            Some("Ana Silva")
        );
        assert_eq!(render("{a} {b}", &["Ana", ""]).as_deref(), Some("Ana"));
        assert_eq!(render("{a} {b}", &["", " "]), None);
        assert_eq!(render("literal", &[]).as_deref(), Some("literal"));
        assert_eq!(render("{{x}}", &[]).as_deref(), Some("{x}"));
    }

    #[test]
    fn render_into_agrees_with_render() {
        let mut template = Template::parse(" Mr {a} {b} ").unwrap();
        template.bind(&|name| if name == "a" { 0 } else { 1 });
        let mut buf = String::from("stale");
        for values in [["Ana", "Silva"], ["Ana", ""], ["", ""], [" ", "x"]] {
            let rendered = template.render(|i| values[i]);
            let ok = template.render_into(|i| values[i], &mut buf);
            assert_eq!(ok, rendered.is_some());
            if let Some(r) = rendered {
                assert_eq!(buf, r);
            }
        }
    }

    #[test]
    fn render_ref_agrees_with_render() {
        for text in ["{a}", " {a} ", "{a}{b}", "x{a}", "{a} {b}", "lit"] {
            let mut template = Template::parse(text).unwrap();
            template.bind(&|name| if name == "a" { 0 } else { 1 });
            for values in [["Ana", "Silva"], [" Ana ", ""], ["", ""], ["\u{a0}", "x"]] {
                let mut buf = String::from("stale");
                let rendered = template.render(|i| values[i]);
                assert_eq!(
                    template.render_ref(|i| values[i], &mut buf),
                    rendered.as_deref(),
                    "{text:?} with {values:?}"
                );
            }
        }
    }

    #[test]
    fn rejects_bad_braces() {
        assert!(Template::parse("{a").is_err());
        assert!(Template::parse("a}").is_err());
        assert!(Template::parse("{}").is_err());
    }
}
