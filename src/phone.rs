//! Phone numbers → E.164, with libphonenumber's semantics and speed to spare.
//!
//! # Why not just `phonenumber::parse` + `phonenumber::is_valid`?
//!
//! We keep the `phonenumber` crate's **metadata** (the compiled
//! `PhoneNumberMetadata.xml`) but not its parser and validator, for two
//! measured reasons (a third: `build.rs` copies the metadata into static data
//! at build time, because the crate's lazy database syntax-checks every
//! pattern on first use, ≈ 0.13 s per run):
//!
//! 1. **Speed.** The crate keeps its ~2,000 metadata regexes in one
//!    `Mutex<LruCache>` of capacity 100, so almost every `is_valid` call
//!    recompiles a regex (≈ 45 µs per number, ≈ 20k numbers/s per core).
//!    Here every region's patterns are compiled once, lazily, per
//!    [`PhoneNormalizer`] (one per worker thread), so matching costs a few
//!    hundred nanoseconds and threads never contend on a lock.
//! 2. **Correctness.** The crate deviates from libphonenumber (the reference,
//!    see SPEC "Precise rules") on about 1% of messy inputs. Each deviation
//!    fixed here is named in a comment starting with `DEVIATION` and pinned by a
//!    unit test below:
//!    - national numbers whose first digits equal the country code (`(55) 97299-0081`
//!      with region BR, Indian numbers starting `91`) lose those digits in the crate;
//!      libphonenumber only strips them when the rest is a better match.
//!    - `+44 (0)131 978 5131` keeps the trunk `0` in the crate; libphonenumber
//!      strips national prefixes after an explicit country code too.
//!    - the crate never falls back to `nationalPrefix` when a region has no
//!      `nationalPrefixForParsing`, and its general descriptors have no
//!      possible lengths (libphonenumber computes their union at build time).
//!
//! The algorithm below follows libphonenumber's `PhoneNumberUtil.parse` and
//! `isValidNumber` (Java) step by step; function names match theirs so the two
//! can be read side by side. The agreement with Python `phonenumbers` (a port of
//! the same library) is measured on a committed corpus by `tests/phone_corpus.rs`.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::sync::OnceLock;

use regex::Regex;
use regex_automata::Anchored;
use regex_automata::dfa::{Automaton, StartKind, dense};
use regex_automata::util::primitives::StateID;
use regex_automata::util::start;

/// Shortest national significant number libphonenumber accepts.
const MIN_LENGTH_FOR_NSN: usize = 2;
/// Longest national significant number libphonenumber accepts.
const MAX_LENGTH_FOR_NSN: usize = 17;
/// Longest input libphonenumber looks at.
const MAX_INPUT_STRING_LENGTH: usize = 250;

/// A valid number in E.164, stored as its digits (country code first) in a `u64`.
///
/// E.164 numbers never start with `0` after the `+`, so the integer is a
/// lossless encoding; 17 digits (the longest valid NSN plus a 1-digit
/// country code... and in practice ≤ 17 digits overall) fit in 57 bits, which
/// the dedup table relies on.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct E164(pub u64);

impl E164 {
    /// Parses `+digits` (as produced by [`E164`]'s `Display`).
    pub fn parse(text: &str) -> Option<E164> {
        let digits = text.strip_prefix('+')?;
        if digits.is_empty() || digits.len() > 19 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok().map(E164)
    }

    /// Number of digits, without the `+`.
    pub fn digit_count(self) -> usize {
        let mut n = self.0;
        let mut count = 1;
        while n >= 10 {
            n /= 10;
            count += 1;
        }
        count
    }

    /// Appends `+digits` to `out` without allocating.
    pub fn write_to(self, out: &mut String) {
        out.push('+');
        out.push_str(itoa::Buffer::new().format(self.0));
    }
}

impl std::fmt::Display for E164 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "+{}", self.0)
    }
}

/// Why a phone number was not accepted; rendered into the report's `detail`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InvalidReason {
    /// The cell was empty (or only whitespace).
    Empty,
    /// No digits, or not shaped like a phone number at all.
    NotANumber,
    /// No `+`/international prefix and neither the row nor the config gave a region.
    NoCountryCode,
    /// `+` followed by digits that are not a country calling code.
    InvalidCountryCode,
    /// Fewer digits than any number of the region.
    TooShort(String),
    /// More digits than any number of the region.
    TooLong(String),
    /// A length or pattern no number of the region has.
    NotValidFor(String),
}

impl std::fmt::Display for InvalidReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InvalidReason::Empty => f.write_str("empty"),
            InvalidReason::NotANumber => f.write_str("not a number"),
            InvalidReason::NoCountryCode => f.write_str("no country code and no region"),
            InvalidReason::InvalidCountryCode => f.write_str("invalid country code"),
            InvalidReason::TooShort(region) => write!(f, "too short for {region}"),
            InvalidReason::TooLong(region) => write!(f, "too long for {region}"),
            InvalidReason::NotValidFor(region) => write!(f, "not a valid {region} number"),
        }
    }
}

/// libphonenumber's `ValidationResult` of `testNumberLength`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LengthCheck {
    IsPossible,
    IsPossibleLocalOnly,
    TooShort,
    InvalidLength,
    TooLong,
}

/// One number descriptor of the metadata, as `build.rs` extracts it.
struct DescMeta {
    pattern: &'static str,
    lengths: &'static [u16],
    local_lengths: &'static [u16],
}

/// One entry of the metadata (a region, or a non-geographic "001" code), as
/// `build.rs` extracts it from the `phonenumber` crate.
pub struct RegionMeta {
    id: &'static str,
    country_code: u16,
    international_prefix: Option<&'static str>,
    national_prefix: Option<&'static str>,
    national_prefix_for_parsing: Option<&'static str>,
    national_prefix_transform_rule: Option<&'static str>,
    leading_digits: Option<&'static str>,
    general: DescMeta,
    /// Whether `types[0]` is the mobile descriptor.
    mobile: bool,
    /// The descriptors a number is classified by: mobile (if any) first, then
    /// premium rate … voicemail, fixed line last.
    types: &'static [DescMeta],
}

impl RegionMeta {
    fn country_code(&self) -> u16 {
        self.country_code
    }
}

// `static REGIONS: &[RegionMeta]`, ordered by country code, main country first.
include!(concat!(env!("OUT_DIR"), "/regions.rs"));

/// A metadata pattern, compiled on first use. A run meets a few hundred
/// regions (junk numbers carry any country code, and `+1` tries up to 25
/// NANPA regions), but matches few of their ~15 patterns each: compiling them
/// all up front was 15% of a 200k-row run's instructions (callgrind), paid by
/// every worker at start, when the rest of the pipeline waits for it.
///
/// Yes/no matches ([`LazyRegex::is_match`]) and match ends
/// ([`LazyRegex::prefix_end`]) walk the pattern's anchored DFA; only a
/// national prefix transform rule's groups (`captures`) need the `regex`
/// crate's engine, which is then built too.
struct LazyRegex {
    source: String,
    regex: OnceCell<Regex>,
    dfa: OnceCell<Option<AnchoredDfa>>,
}

impl LazyRegex {
    /// `^(?:pattern)$` when `full`, else `^(?:pattern)` ("lookingAt").
    /// Metadata patterns contain layout whitespace, which the crate compiles
    /// with `ignore_whitespace`; we do the same with `(?x)`.
    fn new(pattern: &str, full: bool) -> LazyRegex {
        let source = if full {
            format!("(?x-u)^(?:{pattern})$")
        } else {
            format!("(?x-u)^(?:{pattern})")
        };
        LazyRegex {
            source,
            regex: OnceCell::new(),
            dfa: OnceCell::new(),
        }
    }

    fn get(&self) -> &Regex {
        // Metadata patterns are compiled by the crate's own build, so they are valid regexes.
        self.regex.get_or_init(|| {
            Regex::new(&self.source)
                .unwrap_or_else(|e| panic!("metadata pattern does not compile: {e}"))
        })
    }

    /// Whether the pattern matches `text` (whole, or a prefix for "lookingAt").
    fn is_match(&self, text: &str) -> bool {
        match self.dfa.get_or_init(|| AnchoredDfa::new(&self.source)) {
            Some(dfa) => dfa.is_match(text.as_bytes()),
            None => self.get().is_match(text),
        }
    }

    /// Where the pattern's leftmost-first match at the start of `text` ends
    /// ("lookingAt" patterns; `Regex::find` on `^(?:pattern)`).
    fn prefix_end(&self, text: &str) -> Option<usize> {
        match self.dfa.get_or_init(|| AnchoredDfa::new(&self.source)) {
            Some(dfa) => dfa.prefix_end(text.as_bytes()),
            None => self.get().find(text).map(|m| m.end()),
        }
    }

    #[cfg(test)]
    fn is_compiled(&self) -> bool {
        self.regex.get().is_some() || self.dfa.get().is_some_and(Option::is_some)
    }
}

/// A metadata pattern as a fully built, anchored DFA, walked byte by byte.
///
/// Written by hand (the walk, not the automaton) because `Regex::is_match`
/// pays the meta engine's per-call setup — strategy dispatch, `Input`
/// building, the search loop's prefilter and look-around checks — which on
/// a 10-digit national number costs several times the walk itself, and a
/// row runs 3–6 such tests (perf: ≈ 13% of a messy dry run's CPU in regex
/// search functions). `regex-automata` builds the DFA; this only steps it.
struct AnchoredDfa {
    dfa: dense::DFA<Vec<u32>>,
    start: StateID,
}

/// Largest DFA built for one pattern; a pattern over it (none in today's
/// metadata) falls back to the `regex` engine.
const DFA_SIZE_LIMIT: usize = 1 << 20;

impl AnchoredDfa {
    fn new(source: &str) -> Option<AnchoredDfa> {
        let dfa = dense::Builder::new()
            .configure(
                dense::Config::new()
                    .start_kind(StartKind::Anchored)
                    .dfa_size_limit(Some(DFA_SIZE_LIMIT))
                    .determinize_size_limit(Some(DFA_SIZE_LIMIT)),
            )
            .build(source)
            .ok()?;
        let start = dfa
            .start_state(&start::Config::new().anchored(Anchored::Yes))
            .ok()?;
        Some(AnchoredDfa { dfa, start })
    }

    /// regex-automata's DFAs report a match one byte late, so a match state
    /// seen after byte `i` means a match of `text[..i]`: a prefix, which is
    /// all "lookingAt" asks; a pattern ending in `$` only matches at the end.
    fn is_match(&self, text: &[u8]) -> bool {
        let dfa = &self.dfa;
        let mut state = self.start;
        for &byte in text {
            state = dfa.next_state(state, byte);
            if dfa.is_special_state(state) {
                if dfa.is_match_state(state) {
                    return true;
                }
                // No quit states: the patterns have no Unicode word boundary.
                if dfa.is_dead_state(state) {
                    return false;
                }
            }
        }
        dfa.is_match_state(dfa.next_eoi_state(state))
    }

    /// The end of the leftmost-first match at the start of `text`: the last
    /// match state seen before the DFA dies (it dies once no match of higher
    /// priority can follow), as regex-automata's own forward search does.
    fn prefix_end(&self, text: &[u8]) -> Option<usize> {
        let dfa = &self.dfa;
        let mut state = self.start;
        let mut end = None;
        for (at, &byte) in text.iter().enumerate() {
            state = dfa.next_state(state, byte);
            if dfa.is_special_state(state) {
                if dfa.is_match_state(state) {
                    end = Some(at);
                } else if dfa.is_dead_state(state) {
                    return end;
                }
            }
        }
        if dfa.is_match_state(dfa.next_eoi_state(state)) {
            end = Some(text.len());
        }
        end
    }
}

/// One number descriptor (fixed line, mobile, …) with its pattern for full matches.
struct CompiledDesc {
    /// `^(?:pattern)$`.
    full: LazyRegex,
    /// Allowed NSN lengths; empty means "any" (libphonenumber's "same as general").
    lengths: Vec<u16>,
}

impl CompiledDesc {
    fn new(desc: &DescMeta) -> CompiledDesc {
        CompiledDesc {
            full: LazyRegex::new(desc.pattern, true),
            lengths: desc.lengths.to_vec(),
        }
    }

    /// libphonenumber's `isNumberMatchingDesc`.
    fn matches(&self, nsn: &str) -> bool {
        (self.lengths.is_empty() || self.lengths.contains(&(nsn.len() as u16)))
            && self.full.is_match(nsn)
    }
}

/// Everything about one region that parsing and validation need, compiled once.
struct CompiledRegion {
    id: String,
    country_code: u16,
    /// `country_code` as digits, for prefix tests without formatting per row.
    country_code_text: String,
    /// `^(?:internationalPrefix)` — matched with "lookingAt" semantics.
    international_prefix: Option<LazyRegex>,
    /// `^(?:nationalPrefixForParsing)` (falls back to `nationalPrefix`).
    national_prefix_for_parsing: Option<LazyRegex>,
    /// With Java's `$1` turned into `${1}`.
    national_prefix_transform_rule: Option<String>,
    /// `^(?:leadingDigits)` used to pick a region among those sharing a code.
    leading_digits: Option<LazyRegex>,
    /// General descriptor's pattern, full match.
    general: LazyRegex,
    /// Union of the types' possible lengths (libphonenumber's build step computes it).
    general_lengths: Vec<u16>,
    general_local_lengths: Vec<u16>,
    /// The descriptors `getNumberTypeHelper` tries; a number is valid when one
    /// matches. The mobile one, if any, comes first.
    types: Vec<CompiledDesc>,
    /// Whether `types[0]` is the mobile descriptor.
    has_mobile: bool,
}

impl CompiledRegion {
    fn new(meta: &RegionMeta) -> CompiledRegion {
        // Mobile first (build.rs orders them): a CRM's numbers are mostly
        // mobiles, so the first type tried usually matches. libphonenumber tries
        // premium rate first, but only to name the type; whether *some* type
        // matches (validity) does not depend on the order, and the only type we
        // need is "mobile".
        let mut general_lengths: Vec<u16> = Vec::new();
        let mut general_local_lengths: Vec<u16> = Vec::new();
        for desc in meta.types {
            general_lengths.extend_from_slice(desc.lengths);
            general_local_lengths.extend_from_slice(desc.local_lengths);
        }
        general_lengths.sort_unstable();
        general_lengths.dedup();
        general_local_lengths.sort_unstable();
        general_local_lengths.dedup();
        // DEVIATION: the crate ignores `nationalPrefix` when `nationalPrefixForParsing`
        // is absent; libphonenumber's metadata build copies it over.
        let npfp = meta
            .national_prefix_for_parsing
            .map(str::to_owned)
            .or_else(|| meta.national_prefix.map(regex::escape));
        CompiledRegion {
            id: meta.id.to_owned(),
            country_code: meta.country_code,
            country_code_text: meta.country_code.to_string(),
            international_prefix: meta.international_prefix.map(|r| LazyRegex::new(r, false)),
            national_prefix_for_parsing: npfp.map(|p| LazyRegex::new(&p, false)),
            national_prefix_transform_rule: meta
                .national_prefix_transform_rule
                .map(java_replacement_to_rust),
            leading_digits: meta.leading_digits.map(|r| LazyRegex::new(r, false)),
            general: LazyRegex::new(meta.general.pattern, true),
            general_lengths,
            general_local_lengths,
            types: meta.types.iter().map(CompiledDesc::new).collect(),
            has_mobile: meta.mobile,
        }
    }

    /// libphonenumber's `matchNationalNumber(number, generalDesc, false)`.
    fn general_matches(&self, nsn: &str) -> bool {
        self.general.is_match(nsn)
    }

    /// `None` when `nsn` is not valid here, else whether it is a mobile number
    /// (mobile or fixed-line-or-mobile); each pattern is matched at most once.
    fn classify(&self, nsn: &str) -> Option<bool> {
        if !self.general_matches(nsn) {
            return None;
        }
        let index = self.types.iter().position(|t| t.matches(nsn))?;
        Some(index == 0 && self.has_mobile)
    }

    /// libphonenumber's `testNumberLength(number, metadata)` (type UNKNOWN).
    fn test_number_length(&self, len: usize) -> LengthCheck {
        let len = len as u16;
        let Some((&min, rest)) = self.general_lengths.split_first() else {
            return LengthCheck::InvalidLength;
        };
        if self.general_local_lengths.contains(&len) {
            LengthCheck::IsPossibleLocalOnly
        } else if len == min {
            LengthCheck::IsPossible
        } else if len < min {
            LengthCheck::TooShort
        } else if rest.last().is_some_and(|&max| len > max) {
            LengthCheck::TooLong
        } else if rest.contains(&len) {
            LengthCheck::IsPossible
        } else {
            LengthCheck::InvalidLength
        }
    }
}

/// Java replacement strings use `$1`; the regex crate would read `$1x` as a
/// group named `1x`, so every `$N` becomes `${N}`.
fn java_replacement_to_rust(rule: &str) -> String {
    let mut out = String::with_capacity(rule.len() + 4);
    let mut chars = rule.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(|d| d.is_ascii_digit()) {
            let d = chars.next().unwrap_or('0');
            out.push_str("${");
            out.push(d);
            out.push('}');
        } else {
            out.push(c);
        }
    }
    out
}

/// Static tables derived from the metadata once per process: which regions
/// exist, and which regions share each country calling code.
struct Directory {
    /// Country calling code → metadata, main country first (libphonenumber's order:
    /// the main country, then the others alphabetically). Non-geographic codes (800, 882…)
    /// map to their single "001" entry. Indexed by the code (< 1000): rows look
    /// codes up several times each, and an index is cheaper than hashing.
    by_code: Vec<Vec<&'static RegionMeta>>,
    /// Upper-case region id ("BR") → its metadata, indexed by the letters' positions.
    by_letters: Vec<Option<&'static RegionMeta>>,
}

impl Directory {
    /// The metadata sharing `code`, main country first; empty for an unknown code.
    fn metas(&self, code: u16) -> &[&'static RegionMeta] {
        self.by_code.get(code as usize).map_or(&[], Vec::as_slice)
    }

    /// The main metadata of `code`.
    fn main(&self, code: u16) -> Option<&'static RegionMeta> {
        self.metas(code).first().copied()
    }
}

/// The index of an upper-case two-letter region id in `Directory::by_letters`.
fn letters_index(id: [u8; 2]) -> Option<usize> {
    let [a, b] = id;
    (a.is_ascii_uppercase() && b.is_ascii_uppercase())
        .then(|| (a - b'A') as usize * 26 + (b - b'A') as usize)
}

fn directory() -> &'static Directory {
    static DIRECTORY: OnceLock<Directory> = OnceLock::new();
    DIRECTORY.get_or_init(|| {
        let mut by_code: Vec<Vec<&'static RegionMeta>> = vec![Vec::new(); 1000];
        let mut by_letters = vec![None; 26 * 26];
        // REGIONS is already in libphonenumber's order within each code.
        for meta in REGIONS {
            if meta.id != "001"
                && let &[a, b] = meta.id.as_bytes()
                && let Some(i) = letters_index([a, b])
            {
                by_letters[i] = Some(meta);
            }
            by_code[meta.country_code as usize].push(meta);
        }
        Directory {
            by_code,
            by_letters,
        }
    })
}

/// Whether `region` (any case, trimmed) is a known ISO 3166 alpha-2 region of the metadata.
pub fn canonical_region(region: &str) -> Option<String> {
    known_region(region).map(|meta| meta.id.to_owned())
}

/// The region a `country_column` value names (any case, trimmed), without
/// allocating or hashing: it runs for every row that has a `country_column`.
fn known_region(region: &str) -> Option<&'static RegionMeta> {
    let &[a, b] = crate::record::trim(region).as_bytes() else {
        return None;
    };
    let i = letters_index([a.to_ascii_uppercase(), b.to_ascii_uppercase()])?;
    directory().by_letters[i]
}

/// Where the country code came from (libphonenumber's `CountryCodeSource`).
#[derive(PartialEq, Eq)]
enum CountryCodeSource {
    NumberWithPlusSign,
    NumberWithIdd,
    DefaultCountry,
}

/// A parse failure, before it becomes an [`InvalidReason`].
enum ParseError {
    NotANumber,
    InvalidCountryCode,
    TooShortAfterIdd,
    TooShortNsn,
    TooLong,
}

/// Normalizes raw phone text to E.164. One per worker thread: it owns the
/// compiled patterns of the regions it has met, so no lock is ever taken.
pub struct PhoneNormalizer {
    /// Compiled regions, by the index of their metadata in `REGIONS`
    /// (looked up several times per row: an index, not a hash).
    compiled: Vec<Option<Box<CompiledRegion>>>,
    /// The region of rows whose `country_column` is empty or not a region.
    default_region: Option<&'static RegionMeta>,
    /// Reused buffers: the digits of the number being parsed, its national
    /// number, and a candidate national number. Parsing runs per phone cell,
    /// and these were 1–2 allocations per row (perf, issue 11).
    scratch: String,
    national: String,
    candidate: String,
}

impl PhoneNormalizer {
    /// `default_region` must already be canonical (see [`canonical_region`]) or `None`.
    pub fn new(default_region: Option<String>) -> PhoneNormalizer {
        PhoneNormalizer {
            compiled: (0..REGIONS.len()).map(|_| None).collect(),
            default_region: default_region.as_deref().and_then(known_region),
            scratch: String::with_capacity(32),
            national: String::with_capacity(32),
            candidate: String::with_capacity(32),
        }
    }

    fn compiled(&mut self, meta: &'static RegionMeta) -> &CompiledRegion {
        // Every metadata reference points into REGIONS.
        let index = (meta as *const RegionMeta as usize - REGIONS.as_ptr() as usize)
            / std::mem::size_of::<RegionMeta>();
        self.compiled[index].get_or_insert_with(|| Box::new(CompiledRegion::new(meta)))
    }

    /// Normalizes one phone cell. `row_region` is the row's `country_column`
    /// value, as read: it is used when it is a region code in any case, else
    /// the default region applies (SPEC "Phones and regions").
    pub fn normalize(
        &mut self,
        raw: &str,
        row_region: Option<&str>,
    ) -> Result<E164, InvalidReason> {
        if crate::record::trim(raw).is_empty() {
            return Err(InvalidReason::Empty);
        }
        let region = row_region.and_then(known_region).or(self.default_region);
        let mut nsn = std::mem::take(&mut self.national);
        let result = self.normalize_parsed(raw, region, &mut nsn);
        self.national = nsn;
        result
    }

    /// [`PhoneNormalizer::normalize`] once the region is known, parsing into `nsn`.
    fn normalize_parsed(
        &mut self,
        raw: &str,
        region: Option<&'static RegionMeta>,
        nsn: &mut String,
    ) -> Result<E164, InvalidReason> {
        let code = match self.parse(raw, region, nsn) {
            Ok(code) => code,
            Err(e) => {
                return Err(match e {
                    ParseError::NotANumber => InvalidReason::NotANumber,
                    ParseError::InvalidCountryCode
                        if region.is_none() && !starts_with_plus(raw) =>
                    {
                        InvalidReason::NoCountryCode
                    }
                    ParseError::InvalidCountryCode => InvalidReason::InvalidCountryCode,
                    ParseError::TooShortAfterIdd | ParseError::TooShortNsn => {
                        InvalidReason::TooShort(region.map_or("any region", |m| m.id).to_owned())
                    }
                    ParseError::TooLong => {
                        InvalidReason::TooLong(region.map_or("any region", |m| m.id).to_owned())
                    }
                });
            }
        };
        let is_mobile = self.mobile_if_valid(code, nsn);
        match is_mobile {
            Some(false) if let Some(mobile) = self.forgotten_plus_mobile(raw, code) => Ok(mobile),
            Some(_) => Ok(to_e164(code, nsn)),
            None => Err(self.explain_invalid(code, nsn)),
        }
    }

    /// CHOICE (SPEC: "where both readings are valid, the choice is documented"):
    /// `4917696639957` with region DE is a valid fixed line to libphonenumber
    /// (`+49 4917696639957`) and a valid mobile whose `+` was forgotten
    /// (`+49 176 96639957`) to a human. Contacts of a messaging tool are mobiles,
    /// so when a number written without `+` or international prefix starts with
    /// its region's country code, libphonenumber's reading is not a mobile, and
    /// the reading with a `+` is a valid mobile, we take the mobile.
    fn forgotten_plus_mobile(&mut self, raw: &str, code: u16) -> Option<E164> {
        if starts_with_plus(raw) {
            return None;
        }
        let digits = normalize(maybe_strip_extension(&build_national_number_for_parsing(
            raw,
        )));
        let rest = digits.strip_prefix(code.to_string().as_str())?;
        // Only the no-prefix reading: the region's international prefix (00…) is not this case.
        if rest.len() < MIN_LENGTH_FOR_NSN {
            return None;
        }
        let mut alt_nsn = String::new();
        let alt_code = self.parse(&format!("+{digits}"), None, &mut alt_nsn).ok()?;
        let is_mobile = self.mobile_if_valid(alt_code, &alt_nsn)?;
        is_mobile.then(|| to_e164(alt_code, &alt_nsn))
    }

    /// Why a parsed number is not valid: length first, then pattern.
    fn explain_invalid(&mut self, code: u16, nsn: &str) -> InvalidReason {
        let Some(meta) = directory().main(code) else {
            return InvalidReason::InvalidCountryCode;
        };
        let region = self.compiled(meta);
        let name = if region.id == "001" {
            format!("+{}", region.country_code)
        } else {
            region.id.clone()
        };
        match region.test_number_length(nsn.len()) {
            LengthCheck::TooShort => InvalidReason::TooShort(name),
            LengthCheck::TooLong => InvalidReason::TooLong(name),
            _ => InvalidReason::NotValidFor(name),
        }
    }

    /// libphonenumber's `isValidNumber`: find the region for the number among
    /// those sharing its code (`getRegionCodeForNumber`), then match its types.
    /// `None` when the number is not valid there, else whether it is a mobile.
    fn mobile_if_valid(&mut self, code: u16, nsn: &str) -> Option<bool> {
        let metas = directory().metas(code);
        if metas.len() == 1 {
            return self.compiled(metas[0]).classify(nsn);
        }
        for &meta in metas {
            let region = self.compiled(meta);
            match &region.leading_digits {
                Some(leading) if leading.is_match(nsn) => return region.classify(nsn),
                Some(_) => {}
                // A region without leading digits is picked when the number is
                // valid in it: that test is the classification itself.
                None => {
                    if let Some(is_mobile) = region.classify(nsn) {
                        return Some(is_mobile);
                    }
                }
            }
        }
        None
    }

    /// libphonenumber's `parseHelper`: returns the country code, and leaves
    /// the national significant number in `national`.
    fn parse(
        &mut self,
        raw: &str,
        default_meta: Option<&'static RegionMeta>,
        national: &mut String,
    ) -> Result<u16, ParseError> {
        if raw.len() > MAX_INPUT_STRING_LENGTH {
            return Err(ParseError::TooLong);
        }
        let number = build_national_number_for_parsing(raw);
        let Some(number) = viable_without_extension(&number) else {
            return Err(ParseError::NotANumber);
        };
        // checkRegionForParsing: without a known region the number must start with '+'.
        if default_meta.is_none() && !starts_with_plus(number) {
            return Err(ParseError::InvalidCountryCode);
        }
        let mut code = match self.maybe_extract_country_code(number, default_meta, national) {
            Ok(code) => code,
            Err(ParseError::InvalidCountryCode) if starts_with_plus(number) => {
                let stripped = number.trim_start_matches(['+', '\u{FF0B}']);
                let code = self.maybe_extract_country_code(stripped, default_meta, national)?;
                if code == 0 {
                    return Err(ParseError::InvalidCountryCode);
                }
                code
            }
            Err(e) => return Err(e),
        };
        let mut region_meta = default_meta;
        if code != 0 {
            let main = directory().main(code);
            // Same region, compared by address: each region has one entry in
            // REGIONS, and a row's region is never a non-geographic "001"
            // entry (those share one id), so this is the id comparison without
            // a `memcmp` call per row.
            if main.map(std::ptr::from_ref) != default_meta.map(std::ptr::from_ref) {
                region_meta = main;
            }
        } else {
            national.clear();
            normalize_into(number, national);
            code = default_meta.map(|m| m.country_code()).unwrap_or(0);
        }
        if national.len() < MIN_LENGTH_FOR_NSN {
            return Err(ParseError::NotANumber);
        }
        if let Some(meta) = region_meta {
            let mut potential = std::mem::take(&mut self.candidate);
            let region = self.compiled(meta);
            if national_prefix_stripped(national, region, &mut potential) {
                let check = region.test_number_length(potential.len());
                if !matches!(
                    check,
                    LengthCheck::TooShort
                        | LengthCheck::IsPossibleLocalOnly
                        | LengthCheck::InvalidLength
                ) {
                    std::mem::swap(national, &mut potential);
                }
            }
            self.candidate = potential;
        }
        if national.len() < MIN_LENGTH_FOR_NSN {
            return Err(ParseError::TooShortNsn);
        }
        if national.len() > MAX_LENGTH_FOR_NSN {
            return Err(ParseError::TooLong);
        }
        if code == 0 {
            return Err(ParseError::InvalidCountryCode);
        }
        Ok(code)
    }

    /// libphonenumber's `maybeExtractCountryCode`: returns the code or 0, and
    /// leaves the national number in `national` (empty with 0).
    fn maybe_extract_country_code(
        &mut self,
        number: &str,
        default_meta: Option<&'static RegionMeta>,
        national: &mut String,
    ) -> Result<u16, ParseError> {
        national.clear();
        if number.is_empty() {
            return Ok(0);
        }
        let mut full = std::mem::take(&mut self.scratch);
        let source = {
            let idd = default_meta.and_then(|m| self.compiled(m).international_prefix.as_ref());
            maybe_strip_international_prefix_and_normalize(number, idd, &mut full)
        };
        let result = if source != CountryCodeSource::DefaultCountry {
            if full.len() <= MIN_LENGTH_FOR_NSN {
                Err(ParseError::TooShortAfterIdd)
            } else {
                match extract_country_code(&full) {
                    Some((code, rest)) => {
                        national.push_str(rest);
                        Ok(code)
                    }
                    None => Err(ParseError::InvalidCountryCode),
                }
            }
        } else if let Some(meta) = default_meta {
            // DEVIATION: the crate strips a leading country code unconditionally; libphonenumber
            // only does when the rest matches the region better (or the whole is too long).
            let region = self.compiled(meta);
            let mut outcome = Ok(0);
            if let Some(rest) = full.strip_prefix(region.country_code_text.as_str()) {
                // The potential national number.
                if !national_prefix_stripped(rest, region, national) {
                    national.push_str(rest);
                }
                if (!region.general_matches(&full) && region.general_matches(national))
                    || region.test_number_length(full.len()) == LengthCheck::TooLong
                {
                    outcome = Ok(region.country_code);
                } else {
                    national.clear();
                }
            }
            outcome
        } else {
            Ok(0)
        };
        self.scratch = full;
        result
    }
}

/// `+<code><nsn>` as an integer (see [`E164`]).
fn to_e164(code: u16, nsn: &str) -> E164 {
    let national: u64 = nsn.parse().unwrap_or(0);
    E164(code as u64 * 10u64.pow(nsn.len() as u32) + national)
}

fn starts_with_plus(s: &str) -> bool {
    let s = s
        .trim_start_matches(|c: char| !(c == '+' || c == '\u{FF0B}' || decimal_digit(c).is_some()));
    s.starts_with(['+', '\u{FF0B}'])
}

/// The value of a Unicode decimal digit (`\p{Nd}`) for the scripts CRM exports
/// actually contain: ASCII, full-width, Arabic-Indic, Eastern Arabic-Indic and
/// Devanagari. Written by hand because std has no `\p{Nd}` → value mapping;
/// other scripts' digits are treated as letters (documented in the README).
fn decimal_digit(c: char) -> Option<u8> {
    let base = match c {
        '0'..='9' => '0',
        '\u{FF10}'..='\u{FF19}' => '\u{FF10}',
        '\u{0660}'..='\u{0669}' => '\u{0660}',
        '\u{06F0}'..='\u{06F9}' => '\u{06F0}',
        '\u{0966}'..='\u{096F}' => '\u{0966}',
        _ => return None,
    };
    Some((c as u32 - base as u32) as u8)
}

/// libphonenumber's `buildNationalNumberForParsing`, including RFC 3966 `tel:` URIs.
/// Borrows from `raw` unless a `;` parameter (`phone-context`, `isub`) needs work.
fn build_national_number_for_parsing(raw: &str) -> Cow<'_, str> {
    const PHONE_CONTEXT: &str = ";phone-context=";
    if !raw.contains(';') {
        // Neither parameter can be there: the common case, without a copy.
        return Cow::Borrowed(extract_possible_number(raw));
    }
    let mut out = String::new();
    if let Some(index) = raw.find(PHONE_CONTEXT) {
        let context_start = index + PHONE_CONTEXT.len();
        let context = &raw[context_start..];
        let context = &context[..context.find(';').unwrap_or(context.len())];
        if context.starts_with('+') {
            out.push_str(context);
        }
        let start = raw.find("tel:").map(|i| i + 4).unwrap_or(0);
        if start < index {
            out.push_str(&raw[start..index]);
        }
    } else {
        out.push_str(extract_possible_number(raw));
    }
    if let Some(index) = out.find(";isub=") {
        out.truncate(index);
    }
    Cow::Owned(out)
}

/// libphonenumber's `extractPossibleNumber`: from the first `+` or digit, minus
/// trailing junk and any second number (`/ x`).
fn extract_possible_number(raw: &str) -> &str {
    let mut number = if raw.is_ascii() {
        // The usual cell: bytes, not characters (a proptest holds both to the same answer).
        let Some(start) = raw.bytes().position(|b| b == b'+' || b.is_ascii_digit()) else {
            return "";
        };
        raw[start..].trim_end_matches(|c: char| !(c.is_ascii_alphanumeric() || c == '#'))
    } else {
        possible_number_by_chars(raw)
    };
    static SECOND_NUMBER_START: OnceLock<Regex> = OnceLock::new();
    // The pattern starts with `/` or `\`: without either there is nothing to find.
    if number.bytes().any(|b| b == b'/' || b == b'\\') {
        let second = SECOND_NUMBER_START.get_or_init(|| Regex::new(r"[\\/] *x").unwrap());
        if let Some(m) = second.find(number) {
            number = &number[..m.start()];
        }
    }
    number
}

/// [`extract_possible_number`]'s span for any text, character by character.
fn possible_number_by_chars(raw: &str) -> &str {
    let Some(start) = raw.find(|c: char| c == '+' || c == '\u{FF0B}' || decimal_digit(c).is_some())
    else {
        return "";
    };
    // UNWANTED_END_CHAR_PATTERN: trailing chars that are neither letters, numbers nor '#'.
    raw[start..].trim_end_matches(|c: char| !(c.is_alphanumeric() || c == '#'))
}

/// libphonenumber's extension patterns for parsing (`createExtnPattern(true)`).
fn extension_pattern_source() -> String {
    let digits = |n: u32| format!("(\\d{{1,{n}}})");
    let sep = "[ \u{00A0}\\t,]*";
    let after_label = "[:\\.\u{FF0E}]?[ \u{00A0}\\t,-]*";
    let suffix = "#?";
    let explicit = "(?:e?xt(?:ensi(?:o\u{0301}?|\u{00F3}))?n?|\u{FF45}?\u{FF58}\u{FF54}\u{FF4E}?|\u{0434}\u{043E}\u{0431}|anexo)";
    let ambiguous = "(?:[x\u{FF58}#\u{FF03}~\u{FF5E}]|int|\u{FF49}\u{FF4E}\u{FF54})";
    let rfc = format!(";ext={}", digits(20));
    let explicit_extn = format!("{sep}{explicit}{after_label}{}{suffix}", digits(20));
    let ambiguous_extn = format!("{sep}{ambiguous}{after_label}{}{suffix}", digits(9));
    let american = format!("[- ]+{}#", digits(6));
    let sep_no_comma = "[ \u{00A0}\\t]*";
    let auto_dialling = format!(
        "{sep_no_comma}(?:,{{2}}|;){after_label}{}{suffix}",
        digits(15)
    );
    let only_commas = format!("{sep_no_comma}(?:,)+{after_label}{}{suffix}", digits(9));
    format!("{rfc}|{explicit_extn}|{ambiguous_extn}|{american}|{auto_dialling}|{only_commas}")
}

/// Whether `text` uses only the plain phone alphabet: ASCII digits and
/// `+ ( ) - . /` and space — how most exports write numbers.
///
/// Plain text cannot hold an extension: every alternative of the extension
/// pattern needs a letter, `#`, `~`, `,` or `;`. And libphonenumber's
/// VALID_PHONE_NUMBER_PATTERN reduces, on plain text, to a count of digits
/// (see [`plain_is_viable`]). So plain text skips both regexes; the proptests
/// below hold both shortcuts to the regexes they replace.
fn is_plain(text: &str) -> bool {
    text.bytes().all(|b| {
        matches!(
            b,
            b'0'..=b'9' | b'+' | b'(' | b')' | b'-' | b'.' | b'/' | b' '
        )
    })
}

/// VALID_PHONE_NUMBER_PATTERN on plain text ([`is_plain`]): exactly two
/// digits, or leading `+`s then punctuation and at least three digits (every
/// other plain character is punctuation to libphonenumber).
fn plain_is_viable(number: &str) -> bool {
    // One pass: digits counted, and whether a `+` follows anything but `+`s.
    let (mut digits, mut inner_plus, mut leading) = (0, false, true);
    for b in number.bytes() {
        leading &= b == b'+';
        inner_plus |= b == b'+' && !leading;
        digits += b.is_ascii_digit() as usize;
    }
    if number.len() == 2 && digits == 2 {
        return true;
    }
    digits >= 3 && !inner_plus
}

/// libphonenumber's `isViablePhoneNumber` (VALID_PHONE_NUMBER_PATTERN, full match).
fn is_viable_phone_number(number: &str) -> bool {
    if is_plain(number) {
        return plain_is_viable(number);
    }
    is_viable_by_pattern(number)
}

/// [`is_viable_phone_number`] by libphonenumber's pattern itself.
fn is_viable_by_pattern(number: &str) -> bool {
    static VALID: OnceLock<Regex> = OnceLock::new();
    if number.chars().count() < MIN_LENGTH_FOR_NSN {
        return false;
    }
    let re = VALID.get_or_init(|| {
        let punct = "\\-x\u{2010}-\u{2015}\u{2212}\u{30FC}\u{FF0D}-\u{FF0F} \u{00A0}\u{00AD}\u{200B}\u{2060}\u{3000}()\u{FF08}\u{FF09}\u{FF3B}\u{FF3D}.\\[\\]/~\u{2053}\u{223C}\u{FF5E}";
        let digit = "\\d";
        let valid = format!(
            "{digit}{{2}}|[+\u{FF0B}]*(?:[{punct}*]*{digit}){{3,}}[{punct}*A-Za-z{digit}]*"
        );
        Regex::new(&format!(
            "(?i)^(?:(?:{valid})(?:{})?)$",
            extension_pattern_source()
        ))
        .unwrap()
    });
    re.is_match(number)
}

/// libphonenumber's `isViablePhoneNumber`, then `maybeStripExtension`, with
/// one [`is_plain`] scan for both: the number without its extension, or
/// `None` when it is not viable. (Stripping only shortens the end, so the
/// `+` test that comes between them in libphonenumber sees the same start.)
fn viable_without_extension(number: &str) -> Option<&str> {
    if is_plain(number) {
        return plain_is_viable(number).then_some(number);
    }
    is_viable_by_pattern(number).then(|| strip_extension_by_pattern(number))
}

/// libphonenumber's `maybeStripExtension`: returns the number without its extension.
fn maybe_strip_extension(number: &str) -> &str {
    if is_plain(number) {
        return number; // No extension can be written in plain text (see `is_plain`).
    }
    strip_extension_by_pattern(number)
}

/// [`maybe_strip_extension`] by libphonenumber's pattern itself.
fn strip_extension_by_pattern(number: &str) -> &str {
    static EXTN: OnceLock<Regex> = OnceLock::new();
    let re = EXTN
        .get_or_init(|| Regex::new(&format!("(?i)(?:{})$", extension_pattern_source())).unwrap());
    if let Some(m) = re.find(number) {
        let head = &number[..m.start()];
        if is_viable_phone_number(head) {
            return head;
        }
    }
    number
}

/// libphonenumber's `normalize`: letters become keypad digits when the number
/// has at least three of them, otherwise only digits are kept.
fn normalize(number: &str) -> String {
    let mut out = String::with_capacity(number.len());
    normalize_into(number, &mut out);
    out
}

/// [`normalize`], appending to `out`.
fn normalize_into(number: &str, out: &mut String) {
    // ASCII letters are single bytes, and no byte of a multi-byte character is one.
    let letters = number.bytes().filter(u8::is_ascii_alphabetic).count();
    if number.is_ascii() {
        // The usual cell: bytes instead of decoding characters (this runs per row).
        for b in number.bytes() {
            if b.is_ascii_digit() {
                out.push(b as char);
            } else if letters >= 3 && b.is_ascii_alphabetic() {
                out.push(keypad_digit(b as char));
            }
        }
        return;
    }
    for c in number.chars() {
        if let Some(d) = decimal_digit(c) {
            out.push((b'0' + d) as char);
        } else if letters >= 3 && c.is_ascii_alphabetic() {
            out.push(keypad_digit(c));
        }
    }
}

/// ITU E.161 keypad letter → digit.
fn keypad_digit(c: char) -> char {
    match c.to_ascii_uppercase() {
        'A'..='C' => '2',
        'D'..='F' => '3',
        'G'..='I' => '4',
        'J'..='L' => '5',
        'M'..='O' => '6',
        'P'..='S' => '7',
        'T'..='V' => '8',
        _ => '9',
    }
}

/// libphonenumber's `maybeStripInternationalPrefixAndNormalize`; replaces
/// `out` with the normalized digits (prefix removed), in place: it runs per row.
fn maybe_strip_international_prefix_and_normalize(
    number: &str,
    idd: Option<&LazyRegex>,
    out: &mut String,
) -> CountryCodeSource {
    out.clear();
    let trimmed = number.trim_start_matches(['+', '\u{FF0B}']);
    if trimmed.len() != number.len() {
        normalize_into(trimmed, out);
        return CountryCodeSource::NumberWithPlusSign;
    }
    normalize_into(number, out);
    if let Some(idd) = idd
        && let Some(end) = idd.prefix_end(out)
    {
        // Country calling codes never start with 0: "0 0 0..." after the IDD is not one.
        if !out[end..].starts_with('0') {
            out.drain(..end);
            return CountryCodeSource::NumberWithIdd;
        }
    }
    CountryCodeSource::DefaultCountry
}

/// libphonenumber's `extractCountryCode`: the 1–3 leading digits that form a known code.
fn extract_country_code(full: &str) -> Option<(u16, &str)> {
    if full.is_empty() || full.starts_with('0') {
        return None;
    }
    for len in 1..=3.min(full.len()) {
        let code: u16 = full[..len].parse().ok()?;
        if !directory().metas(code).is_empty() {
            return Some((code, &full[len..]));
        }
    }
    None
}

/// libphonenumber's `maybeStripNationalPrefixAndCarrierCode`: whether the
/// number loses its national prefix; if so, `out` is replaced with the rest
/// (else it is left empty).
fn national_prefix_stripped(number: &str, region: &CompiledRegion, out: &mut String) -> bool {
    out.clear();
    let Some(prefix) = region.national_prefix_for_parsing.as_ref() else {
        return false;
    };
    if number.is_empty() {
        return false;
    }
    // Most national numbers carry no prefix: the DFA says so without the
    // regex engine. Only a transform rule needs the groups (`captures`).
    let Some(whole) = prefix.prefix_end(number) else {
        return false;
    };
    let viable_original = region.general_matches(number);
    if let Some(rule) = region
        .national_prefix_transform_rule
        .as_ref()
        .filter(|rule| !rule.is_empty())
    {
        let Some(caps) = prefix.get().captures(number) else {
            return false;
        };
        if caps.get(caps.len() - 1).is_some() {
            caps.expand(rule, out);
        }
    }
    out.push_str(&number[whole..]);
    if viable_original && !region.general_matches(out) {
        out.clear();
        return false;
    }
    true
}

/// `true` when `text` could be a Weni `whatsapp:`/`tel:` path: 8–15 digits (API.md §1.3.1).
pub fn weni_digit_count_ok(e164: E164) -> bool {
    (8..=15).contains(&e164.digit_count())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The plain-text shortcut of `isViablePhoneNumber` agrees with the pattern.
        #[test]
        fn plain_viability_agrees_with_the_pattern(text in "[0-9+()./ -]{0,20}") {
            prop_assert!(is_plain(&text));
            prop_assert_eq!(plain_is_viable(&text), is_viable_by_pattern(&text), "{:?}", text);
        }

        /// Plain text never holds an extension for the pattern either.
        #[test]
        fn plain_text_has_no_extension_for_the_pattern(text in "[0-9+()./ -]{0,24}") {
            prop_assert_eq!(strip_extension_by_pattern(&text), text.as_str());
        }

        /// On ASCII text, the byte scan finds the span the character scan finds.
        #[test]
        fn ascii_possible_number_agrees_with_the_character_scan(
            text in "[ -~]{0,6}[0-9+#a-z ()./-]{0,16}[ -~]{0,6}"
        ) {
            let by_bytes = extract_possible_number(&text);
            let by_chars = possible_number_by_chars(&text);
            // `extract_possible_number` may then cut a second number (`/ x`) off.
            prop_assert!(by_chars.starts_with(by_bytes), "{:?}: {:?} vs {:?}", text, by_bytes, by_chars);
            if !by_chars.contains(['/', '\\']) {
                prop_assert_eq!(by_bytes, by_chars, "{:?}", text);
            }
        }

        /// Text just outside the plain alphabet takes the pattern's path.
        #[test]
        fn text_with_other_characters_is_not_plain(
            text in "[0-9+()./ -]{0,8}[x#~,;a-zA-Z\u{a0}][0-9+()./ -]{0,8}"
        ) {
            prop_assert!(!is_plain(&text));
        }
    }

    fn br() -> PhoneNormalizer {
        PhoneNormalizer::new(Some("BR".into()))
    }

    fn e164(n: &mut PhoneNormalizer, raw: &str, region: Option<&str>) -> String {
        match n.normalize(raw, region) {
            Ok(e) => e.to_string(),
            Err(r) => format!("invalid: {r}"),
        }
    }

    #[test]
    fn brazilian_formats() {
        let mut n = br();
        assert_eq!(e164(&mut n, "(11) 98765-4321", None), "+5511987654321");
        assert_eq!(e164(&mut n, "+55 11 98765 4321", None), "+5511987654321");
        assert_eq!(e164(&mut n, "011 98765-4321", None), "+5511987654321");
        assert_eq!(e164(&mut n, "5511987654321", None), "+5511987654321");
    }

    /// Patterns compiled so far, over every region this normalizer has met.
    fn compiled_patterns(n: &PhoneNormalizer) -> usize {
        n.compiled
            .iter()
            .flatten()
            .map(|r| {
                [
                    &r.international_prefix,
                    &r.national_prefix_for_parsing,
                    &r.leading_digits,
                ]
                .into_iter()
                .flatten()
                .chain(std::iter::once(&r.general))
                .chain(r.types.iter().map(|t| &t.full))
                .filter(|p| p.is_compiled())
                .count()
            })
            .sum()
    }

    /// `parse` compares regions by address: that is the id comparison only if
    /// every two-letter region has one entry, the one `known_region` gives.
    #[test]
    fn each_region_has_one_entry_and_a_row_region_is_never_non_geographic() {
        for meta in REGIONS {
            match known_region(meta.id) {
                Some(found) => assert!(std::ptr::eq(found, meta), "{} twice", meta.id),
                None => assert_eq!(meta.id, "001"),
            }
        }
    }

    /// Every metadata pattern (all regions and non-geographic codes) builds
    /// as an [`AnchoredDfa`], and its walk answers as the `regex` engine does:
    /// `is_match`, and the end of a "lookingAt" match.
    #[test]
    fn anchored_dfas_answer_as_the_regex_engine() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize
        };
        let texts: Vec<String> = (0..400)
            .map(|_| {
                let len = next() % 18;
                (0..len)
                    .map(|_| match next() % 40 {
                        0 => 'x',
                        _ => char::from(b'0' + (next() % 10) as u8),
                    })
                    .collect()
            })
            .collect();
        let metas = directory().by_code.iter().flatten();
        let (mut pairs, mut matched) = (0, 0);
        for meta in metas {
            let region = CompiledRegion::new(meta);
            let patterns = [
                &region.international_prefix,
                &region.national_prefix_for_parsing,
                &region.leading_digits,
            ];
            let patterns = patterns
                .into_iter()
                .flatten()
                .chain(std::iter::once(&region.general));
            for pattern in patterns.chain(region.types.iter().map(|t| &t.full)) {
                let dfa = AnchoredDfa::new(&pattern.source)
                    .unwrap_or_else(|| panic!("no DFA for {}", pattern.source));
                let regex = pattern.get();
                for text in &texts {
                    let expected = regex.is_match(text);
                    assert_eq!(
                        dfa.is_match(text.as_bytes()),
                        expected,
                        "{} on {text:?}",
                        pattern.source
                    );
                    let end = regex.find(text).map(|m| m.end());
                    assert_eq!(
                        dfa.prefix_end(text.as_bytes()),
                        end,
                        "{} on {text:?}",
                        pattern.source
                    );
                    pairs += 1;
                    matched += expected as usize;
                }
            }
        }
        // The texts must exercise both answers, not only "no".
        assert!(matched * 50 > pairs, "{matched} matches in {pairs} tests");
    }

    /// A Canadian number goes through the US first (+1 is shared by 25
    /// regions): only the patterns that were matched get compiled, not the
    /// ~15 of each region met on the way.
    #[test]
    fn patterns_are_compiled_only_when_matched() {
        let mut n = br();
        assert_eq!(e164(&mut n, "+1 613 555 0143", None), "+16135550143");
        let regions = n.compiled.len();
        let compiled = compiled_patterns(&n);
        assert!(regions >= 2, "US and CA were met, got {regions}");
        assert!(
            compiled <= 3 * regions,
            "{compiled} patterns compiled for {regions} regions"
        );
    }

    /// DEVIATION regression: area code 55 (Rio Grande do Sul) must not be taken for the country code.
    #[test]
    fn brazilian_area_code_equal_to_country_code_is_kept() {
        let mut n = br();
        assert_eq!(e164(&mut n, "(55) 97299-0081", None), "+5555972990081");
    }

    /// DEVIATION regression: Indian numbers starting 91 keep those digits.
    #[test]
    fn indian_number_starting_with_91() {
        let mut n = PhoneNormalizer::new(Some("IN".into()));
        assert_eq!(e164(&mut n, "9123456789", None), "+919123456789");
    }

    /// DEVIATION regression: the trunk 0 in "(0)" is dropped after +44 (the crate keeps it).
    #[test]
    fn uk_trunk_zero_after_country_code() {
        let mut n = br();
        assert_eq!(e164(&mut n, "+44 (0)20 7183 8750", None), "+442071838750");
    }

    #[test]
    fn region_from_row_overrides_default() {
        let mut n = br();
        assert_eq!(e164(&mut n, "(202) 456-1111", Some("us")), "+12024561111");
        // Not an ISO alpha-2 code: counts as empty, so BR applies and fails.
        assert!(e164(&mut n, "(202) 456-1111", Some("United States")).starts_with("invalid"));
    }

    #[test]
    fn no_region_needs_a_plus() {
        let mut n = PhoneNormalizer::new(None);
        assert_eq!(
            n.normalize("11 98765 4321", None),
            Err(InvalidReason::NoCountryCode)
        );
        assert_eq!(e164(&mut n, "+55 11 98765 4321", None), "+5511987654321");
    }

    #[test]
    fn reasons() {
        let mut n = br();
        assert_eq!(n.normalize("", None), Err(InvalidReason::Empty));
        assert_eq!(n.normalize("n/a", None), Err(InvalidReason::NotANumber));
        assert_eq!(
            n.normalize("1234", None),
            Err(InvalidReason::TooShort("BR".into()))
        );
        assert_eq!(
            n.normalize("+999 1234 5678", None),
            Err(InvalidReason::InvalidCountryCode)
        );
    }

    #[test]
    fn extensions_are_ignored() {
        let mut n = PhoneNormalizer::new(Some("US".into()));
        assert_eq!(e164(&mut n, "202-456-1111 ext. 12", None), "+12024561111");
        assert_eq!(e164(&mut n, "202 456 1111 x12", None), "+12024561111");
    }

    #[test]
    fn double_zero_international_prefix() {
        let mut n = PhoneNormalizer::new(Some("DE".into()));
        assert_eq!(e164(&mut n, "0044 20 7946 0018", None), "+442079460018");
    }

    proptest::proptest! {
        /// Any text: no panic; a number we accept normalizes to itself when written in E.164.
        #[test]
        fn never_panics_and_is_idempotent(raw in "[0-9 +()./x-]{0,24}", region in "(BR|US|DE|IN|GB|)") {
            let mut n = PhoneNormalizer::new((!region.is_empty()).then(|| region.clone()));
            if let Ok(e) = n.normalize(&raw, None) {
                proptest::prop_assert_eq!(n.normalize(&e.to_string(), None), Ok(e));
            }
        }

        /// Spaces, dashes and parentheses between digits never change the result.
        #[test]
        fn punctuation_is_ignored(national in "[1-9][0-9]{9}", sep in "[ .-]") {
            let mut n = br();
            let plain = n.normalize(&format!("+55{national}"), None);
            let spaced = format!("+55 ({}){sep}{}{sep}{}", &national[..2], &national[2..6], &national[6..]);
            proptest::prop_assert_eq!(n.normalize(&spaced, None), plain);
        }
    }

    /// Every region's patterns compile as ASCII-digit regexes (`(?-u)`), so no row can hit a panic.
    #[test]
    fn every_region_compiles() {
        let dir = directory();
        let regions = dir.by_letters.iter().flatten().count();
        assert!(regions > 240, "{regions} regions");
        assert!(!dir.metas(800).is_empty() && !dir.metas(882).is_empty());
        for metas in &dir.by_code {
            for meta in metas {
                let region = CompiledRegion::new(meta);
                assert!(
                    !region.general_lengths.is_empty() || region.types.is_empty(),
                    "{}",
                    region.id
                );
            }
        }
    }

    #[test]
    fn e164_text_roundtrip() {
        let e = E164(5511987654321);
        let mut s = String::new();
        e.write_to(&mut s);
        assert_eq!(s, "+5511987654321");
        assert_eq!(E164::parse(&s), Some(e));
        assert_eq!(e.digit_count(), 13);
    }
}
