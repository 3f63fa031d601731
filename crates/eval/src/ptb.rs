//! The caption tokenisation of pycocoevalcap: Stanford CoreNLP 3.4.1's `PTBTokenizer
//! -preserveLines -lowerCase` over all captions at once (one per line), then its punctuation
//! tokens dropped.
//!
//! This is CoreNLP's lexer itself, `PTBLexer.flex` of v3.4.1 (read from stanfordnlp/CoreNLP):
//! its macros verbatim, its rules in their order with the actions of pycocoevalcap's options
//! (PTB3 escaping, `tokenizeNLs`, no americanisation), run with JFlex's semantics: at each
//! position the longest match wins, the earlier rule on a tie; a rule `r1/r2` counts its
//! trailing context `r2` in that length and returns the longest `r1` before a match of `r2`
//! (JFlex 1.5.1's general lookahead, which generated CoreNLP's scanner); `%caseless` makes
//! every letter outside a character class match both cases. `tests/fixtures/eval/ptb.json`
//! (scripts/ptb_reference.py: every ASCII punctuation mark alone, repeated, mixed and glued to
//! words, quotes, brackets, abbreviations, numbers, contractions, URLs, smileys, entities; 4842
//! captions through pycocoevalcap's own call) is matched line for line.
//!
//! One quirk is kept on purpose: CoreNLP writes brackets as `-LRB-`…, lower-cased to `-lrb-`,
//! which pycocoevalcap's (upper-case) punctuation list then fails to drop.

use std::collections::HashMap;
use std::sync::OnceLock;

use regex_automata::hybrid::dfa::{Cache, OverlappingState, DFA};
use regex_automata::{Anchored, Input, MatchKind};

/// Tokens pycocoevalcap removes after tokenising (compared case-sensitively, as it does).
const PUNCTUATION: [&str; 17] = [
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
    "...", ";",
];

/// Tokenises one caption the way pycocoevalcap does and joins the tokens with single spaces.
pub fn tokenize(text: &str) -> String {
    tokenize_lines(&[text]).pop().unwrap_or_default()
}

/// Tokenises captions the way one pycocoevalcap `PTBTokenizer.tokenize` call does: written one
/// per line (line breaks inside a caption become spaces) and lexed as one text, so a caption's
/// last token may depend on the next caption's first word, as in pycocoevalcap.
pub fn tokenize_lines<S: AsRef<str>>(captions: &[S]) -> Vec<String> {
    let text: Vec<String> = captions
        .iter()
        .map(|c| c.as_ref().replace(is_newline, " "))
        .collect();
    let lines = lex_lines(&text.join("\n"));
    if lines.len() != captions.len() {
        // A token spanned a line end (an SGML tag whose quoted attribute runs into the next
        // caption): CoreNLP would shift every later caption onto the wrong image. Each caption
        // on its own instead.
        return text
            .iter()
            .map(|t| lex_lines(t).concat().join(" "))
            .collect();
    }
    lines.into_iter().map(|l| l.join(" ")).collect()
}

/// The tokens of each line of `text`, lower-cased, punctuation dropped.
fn lex_lines(text: &str) -> Vec<Vec<String>> {
    let mut lines = vec![Vec::new()];
    for tok in lexer().lex(text) {
        match tok {
            Token::Newline => lines.push(Vec::new()),
            Token::Word(w) => {
                let w = w.to_lowercase();
                if !PUNCTUATION.contains(&w.as_str()) {
                    lines.last_mut().expect("a line").push(w);
                }
            }
        }
    }
    lines
}

/// The lexer's `{NEWLINE}`: a caption holding one would shift every later caption by a line.
fn is_newline(c: char) -> bool {
    matches!(
        c,
        '\r' | '\n' | '\u{2028}' | '\u{2029}' | '\u{000B}' | '\u{000C}' | '\u{0085}'
    )
}

enum Token {
    Word(String),
    Newline,
}

/// `PTBLexer.flex`'s macro definitions, verbatim (JFlex syntax, translated by [`translate`]).
const MACROS: &[(&str, &str)] = &[
    (
        "SGML",
        r#"\<([!\?][A-Za-z\-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:\.\-]*([ ]+([A-Za-z][A-Za-z0-9_:\.\-]*|[A-Za-z][A-Za-z0-9_:\.\-]*[ ]*=[ ]*('[^']*'|\"[^\"]*\")))*[ ]*\/?|\/[A-Za-z][A-Za-z0-9_:\.\-]*)[ ]*\>"#,
    ),
    (
        "SPMDASH",
        r#"&(MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]"#,
    ),
    ("SPAMP", r#"&amp;"#),
    ("SPPUNC", r#"&(HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);"#),
    ("SPLET", r#"&[aeiouAEIOU](acute|grave|uml);"#),
    ("SPACE", r#"[ \t\u00A0\u2000-\u200A\u3000]"#),
    ("SPACES", r#"{SPACE}+"#),
    ("NEWLINE", r#"\r|\r?\n|\u2028|\u2029|\u000B|\u000C|\u0085"#),
    ("SPACENL", r#"({SPACE}|{NEWLINE})"#),
    ("SPACENLS", r#"{SPACENL}+"#),
    ("SENTEND", r#"{SPACENL}({SPACENL}|[:uppercase:]|{SGML})"#),
    ("DIGIT", r#"[:digit:]|[\u07C0-\u07C9]"#),
    (
        "DATE",
        r#"{DIGIT}{1,2}[\-\/]{DIGIT}{1,2}[\-\/]{DIGIT}{2,4}"#,
    ),
    (
        "NUM",
        r#"{DIGIT}+|{DIGIT}*([.:,\u00AD\u066B\u066C]{DIGIT}+)+"#,
    ),
    ("NUMBER", r#"[\-+]?{NUM}"#),
    (
        "SUBSUPNUM",
        r#"[\u207A\u207B\u208A\u208B]?([\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)"#,
    ),
    (
        "FRAC",
        r#"({DIGIT}{1,4}[- \u00A0])?{DIGIT}{1,4}(\\?\/|\u2044){DIGIT}{1,4}"#,
    ),
    (
        "FRACSTB3",
        r#"({DIGIT}{1,4}-)?{DIGIT}{1,4}(\\?\/|\u2044){DIGIT}{1,4}"#,
    ),
    ("FRAC2", r#"[\u00BC\u00BD\u00BE\u2153-\u215E]"#),
    ("DOLSIGN", r#"([A-Z]*\$|#)"#),
    (
        "DOLSIGN2",
        r#"[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]"#,
    ),
    (
        "LETTER",
        r#"([:letter:]|{SPLET}|[\u00AD\u0237-\u024F\u02C2-\u02C5\u02D2-\u02DF\u02E5-\u02FF\u0300-\u036F\u0370-\u037D\u0384\u0385\u03CF\u03F6\u03FC-\u03FF\u0483-\u0487\u04CF\u04F6-\u04FF\u0510-\u0525\u055A-\u055F\u0591-\u05BD\u05BF\u05C1\u05C2\u05C4\u05C5\u05C7\u0615-\u061A\u063B-\u063F\u064B-\u065E\u0670\u06D6-\u06EF\u06FA-\u06FF\u070F\u0711\u0730-\u074F\u0750-\u077F\u07A6-\u07B1\u07CA-\u07F5\u07FA\u0900-\u0903\u093C\u093E-\u094E\u0951-\u0955\u0962-\u0963\u0981-\u0983\u09BC-\u09C4\u09C7\u09C8\u09CB-\u09CD\u09D7\u09E2\u09E3\u0A01-\u0A03\u0A3C\u0A3E-\u0A4F\u0A81-\u0A83\u0ABC-\u0ACF\u0B82\u0BBE-\u0BC2\u0BC6-\u0BC8\u0BCA-\u0BCD\u0C01-\u0C03\u0C3E-\u0C56\u0D3E-\u0D44\u0D46-\u0D48\u0E30-\u0E3A\u0E47-\u0E4E\u0EB1-\u0EBC\u0EC8-\u0ECD])"#,
    ),
    (
        "WORD",
        r#"{LETTER}({LETTER}|{DIGIT})*([.!?]{LETTER}({LETTER}|{DIGIT})*)*"#,
    ),
    (
        "FILENAME_EXT",
        r#"bat|bmp|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov|mp3|pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip"#,
    ),
    (
        "FILENAME",
        r#"({LETTER}|{DIGIT})+([.]({LETTER}|{DIGIT})+)*([.]{FILENAME_EXT})"#,
    ),
    (
        "THING",
        r#"([dDoOlL]{APOSETCETERA}([:letter:]|[:digit:]))?([:letter:]|[:digit:])+({HYPHEN}([dDoOlL]{APOSETCETERA}([:letter:]|[:digit:]))?([:letter:]|[:digit:])+)*"#,
    ),
    ("THINGA", r#"[A-Z]+(([+&]|{SPAMP})[A-Z]+)+"#),
    (
        "THING3",
        r#"[A-Za-z0-9]+(-[A-Za-z]+){0,2}(\\?\/[A-Za-z0-9]+(-[A-Za-z]+){0,2}){1,2}"#,
    ),
    ("APOS", r#"['\u0092\u2019]|&apos;"#),
    ("APOSETCETERA", r#"{APOS}|[`\u0091\u2018\u201B]"#),
    (
        "HTHING",
        r#"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(-([A-Za-z0-9\u00AD]+|{ACRO2}\.))+"#,
    ),
    ("REDAUX", r#"{APOS}([msdMSD]|re|ve|ll)"#),
    ("SWORD", r#"[A-Za-z\u00AD]*[A-MO-Za-mo-z](\u00AD)*"#),
    ("SREDAUX", r#"n{APOSETCETERA}t"#),
    (
        "APOWORD",
        r#"{APOS}n{APOS}?|[lLdDjJ]{APOS}|Dunkin{APOS}|somethin{APOS}|ol{APOS}|{APOS}em|[A-HJ-XZn]{APOSETCETERA}[:letter:]{2}[:letter:]*|{APOS}[2-9]0s|{APOS}till?|[:letter:][:letter:]*[aeiouyAEIOUY]{APOSETCETERA}[aeiouA-Z][:letter:]*|{APOS}cause|cont'd\.?|'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l|O{APOSETCETERA}o"#,
    ),
    ("APOWORD2", r#"y{APOS}"#),
    (
        "FULLURL",
        r#"https?:\/\/[^ \t\n\f\r\"<>|(){}]+[^ \t\n\f\r\"<>|.!?(){},-]"#,
    ),
    (
        "LIKELYURL",
        r#"((www\.([^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4})|(([^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+(com|net|org|edu)))(\/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?"#,
    ),
    (
        "EMAIL",
        r#"(&lt;|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00A0{}]*@([^ \t\n\f\r\"<>|(){}.\u00A0]+\.)*([^ \t\n\f\r\"<>|(){}.\u00A0]+)(&gt;|>)?"#,
    ),
    ("TWITTER_NAME", r#"@[a-zA-Z_][a-zA-Z_0-9]*"#),
    ("TWITTER_CATEGORY", r#"#{LETTER}+"#),
    ("TWITTER", r#"{TWITTER_NAME}|{TWITTER_CATEGORY}"#),
    (
        "ABMONTH",
        r#"Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec"#,
    ),
    ("ABDAYS", r#"Mon|Tue|Tues|Wed|Thu|Thurs|Fri"#),
    (
        "ABSTATE",
        r#"Ala|Ariz|[A]z|[A]rk|Calif|Colo|Conn|Ct|Dak|[D]el|Fla|Ga|[I]ll|Ind|Kans?|Ky|[L]a|[M]ass|Md|Mich|Minn|[M]iss|Mo|Mont|Neb|Nev|Okla|[O]re|[P]a|Penn|Tenn|[T]ex|Va|Vt|[W]ash|Wisc?|Wyo"#,
    ),
    (
        "ABCOMP",
        r#"Inc|Cos?|Corp|Pp?t[ye]s?|Ltd|Plc|Rt|Bancorp|Bhd|Assn|Univ|Intl|Sys"#,
    ),
    ("ABNUM", r#"tel|est|ext|sq"#),
    ("ABPTIT", r#"Jr|Sr|Bros|(Ed|Ph)\.D|Blvd|Rd|Esq"#),
    (
        "ABBREV1",
        r#"({ABMONTH}|{ABDAYS}|{ABSTATE}|{ABCOMP}|{ABNUM}|{ABPTIT}|etc|al|seq|Bldg)\."#,
    ),
    (
        "ACRO",
        r#"[A-Za-z](\.[A-Za-z])*|(Canada|Sino|Korean|EU|Japan|non)-U\.S|U\.S\.-(U\.K|U\.S\.S\.R)"#,
    ),
    (
        "ACRO2",
        r#"[A-Za-z](\.[A-Za-z])+|(Canada|Sino|Korean|EU|Japan|non)-U\.S|U\.S\.-(U\.K|U\.S\.S\.R)"#,
    ),
    (
        "ABTITLE",
        r#"Mr|Mrs|Ms|[M]iss|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj|Sgt|Cpl|Pvt|Capt|Ste?|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Mt|Ft|Adj|Adv|Asst|Assoc|Ens|Insp|Mlle|Mme|Msgr|Sfc"#,
    ),
    ("ABCOMP2", r#"Invt|Elec|Natl|M[ft]g|Dept"#),
    (
        "ABBREV4",
        r#"{ABTITLE}|vs|Alex|Wm|Jos|Cie|a\.k\.a|cf|TREAS|Ph|{ACRO}|{ABCOMP2}"#,
    ),
    ("ABBREV2", r#"{ABBREV4}\."#),
    ("ACRONYM", r#"({ACRO})\."#),
    ("ABBREV3", r#"(ca|figs?|prop|nos?|art|bldg|prop|pp|op)\."#),
    (
        "PHONE",
        r#"(\([0-9]{2,3}\)[ \u00A0]?|(\+\+?)?([0-9]{2,4}[\- \u00A0])?[0-9]{2,4}[\- \u00A0])[0-9]{3,4}[\- \u00A0]?[0-9]{3,5}|((\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}"#,
    ),
    ("FAKEDUCKFEET", r#"<<|>>"#),
    ("LESSTHAN", r#"<|&lt;"#),
    ("GREATERTHAN", r#">|&gt;"#),
    ("HYPHEN", r#"[-_\u058A\u2010\u2011]"#),
    ("HYPHENS", r#"\-+"#),
    ("LDOTS", r#"\.{3,5}|(\.[ \u00A0]){2,4}\.|[\u0085\u2026]"#),
    ("ATS", r#"@+"#),
    ("UNDS", r#"_+"#),
    ("ASTS", r#"\*+|(\\\*){1,3}"#),
    ("HASHES", r#"#+"#),
    ("FNMARKS", r#"{ATS}|{HASHES}|{UNDS}"#),
    ("INSENTP", r#"[,;:\u3001]"#),
    (
        "QUOTES",
        r#"{APOS}|''|[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091\u0092\u0093\u0094\u201E\u201F\u2039\u203A\u00AB\u00BB]{1,2}"#,
    ),
    ("DBLQUOT", r#"\"|&quot;"#),
    (
        "TBSPEC",
        r#"-(RRB|LRB|RCB|LCB|RSB|LSB)-|C\.D\.s|pro-|anti-|S(&|&amp;)P-500|S(&|&amp;)Ls|Cap{APOS}n|c{APOS}est"#,
    ),
    ("TBSPEC2", r#"{APOS}[0-9][0-9]"#),
    ("SMILEY", r#"[<>]?[:;=][\-o\*']?[\(\)DPdpO\\{@\|\[\]]"#),
    (
        "ASIANSMILEY",
        r#"[\^x=~<>]\.\[\^x=~<>]|[\-\^x=~<>']_[\-\^x=~<>']|\([\-\^x=~<>'][_.]?[\-\^x=~<>']\)|\([\^x=~<>']-[\^x=~<>'`]\)"#,
    ),
    (
        "MISCSYMBOL",
        r#"[+%&~\^|\\¦\u00A7¨\u00A9\u00AC\u00AE¯\u00B0-\u00B3\u00B4-\u00BA\u00D7\u00F7\u0387\u05BE\u05C0\u05C3\u05C6\u05F3\u05F4\u0600-\u0603\u0606-\u060A\u060C\u0614\u061B\u061E\u066A\u066D\u0703-\u070D\u07F6\u07F7\u07F8\u0964\u0965\u0E4F\u1FBD\u2016\u2017\u2020-\u2023\u2030-\u2038\u203B\u203E-\u2042\u2044\u207A-\u207F\u208A-\u208E\u2100-\u214F\u2190-\u21FF\u2200-\u2BFF\u3012\u30FB\uFF01-\uFF0F\uFF1A-\uFF20\uFF3B-\uFF40\uFF5B-\uFF65\uFF65]"#,
    ),
];

/// What a rule does with its text, for pycocoevalcap's options.
#[derive(Clone, Copy)]
enum Action {
    /// The text as it is.
    Same,
    /// Soft hyphens removed (an empty token becomes `-`).
    SoftHyphens,
    /// Only the first chars; the last `n` are lexed again (`cannot` → `can`, `not`).
    PushBack(usize),
    /// Spaces become no-break spaces (SGML, fractions).
    Nbsp,
    /// `--`.
    Dash,
    /// `&amp;` → `&`.
    Amp,
    /// Quotes in LaTeX style; `true` when probably an opening one.
    Quotes(bool),
    /// Unicode fractions spelled out.
    Fraction,
    /// Currency signs normalised.
    Currency,
    /// An acronym that ends a sentence: `I.` → `I` and `.`, longer ones keep their period and
    /// give it again as a token of its own.
    Acronym,
    /// An abbreviation that may end a sentence: the word with its period, then the period.
    AbbrevPeriod,
    /// Phone numbers: no-break spaces, bracketed parentheses.
    Phone,
    /// Parentheses written `-LRB-`, `-RRB-` (smileys).
    Parens,
    /// A fixed text.
    Fixed(&'static str),
    /// `-` runs: three or four are a dash `--`.
    Hyphens,
    /// `...`.
    Ellipsis,
    /// No token (spaces, deleted characters).
    Skip,
    Newline,
}

/// `PTBLexer.flex`'s rules in order (`<YyStrictlyTreebank3>{FRACSTB3}`, inactive in the
/// traditional state pycocoevalcap runs in, is left out): the rule, its trailing context, its
/// action.
const RULES: &[(&str, Option<&str>, Action)] = &[
    (r#"c[+][+]"#, None, Action::Same),
    (r#"(c|f)#"#, None, Action::Same),
    (r#"cannot"#, None, Action::PushBack(3)),
    (r#"'twas"#, None, Action::PushBack(3)),
    (r#"'tis"#, None, Action::PushBack(2)),
    (
        r#"gonna|gotta|lemme|gimme|wanna"#,
        None,
        Action::PushBack(2),
    ),
    (r#"{SGML}"#, None, Action::Nbsp),
    (r#"{SPMDASH}"#, None, Action::Dash),
    (r#"{SPAMP}"#, None, Action::Amp),
    (r#"{SPPUNC}"#, None, Action::Same),
    (r#"{WORD}"#, Some(r#"{REDAUX}"#), Action::SoftHyphens),
    (r#"{SWORD}"#, Some(r#"{SREDAUX}"#), Action::SoftHyphens),
    (r#"{WORD}"#, None, Action::SoftHyphens),
    (r#"{APOWORD}"#, None, Action::Same),
    (r#"{APOWORD2}"#, Some(r#"[:letter:]"#), Action::Same),
    (r#"{FULLURL}"#, None, Action::Same),
    (r#"{LIKELYURL}"#, None, Action::Same),
    (r#"{EMAIL}"#, None, Action::Same),
    (r#"{TWITTER}"#, None, Action::Same),
    (r#"{REDAUX}"#, Some(r#"[^A-Za-z]"#), Action::Quotes(false)),
    (r#"{SREDAUX}"#, Some(r#"[^A-Za-z]"#), Action::Quotes(false)),
    (r#"{DATE}"#, None, Action::Same),
    (r#"{NUMBER}"#, None, Action::SoftHyphens),
    (r#"{SUBSUPNUM}"#, None, Action::Same),
    (r#"{FRAC}"#, None, Action::Nbsp),
    (r#"{FRAC2}"#, None, Action::Fraction),
    (r#"{TBSPEC}"#, None, Action::Amp),
    (r#"{THING3}"#, None, Action::Same),
    (r#"{DOLSIGN}"#, None, Action::Same),
    (r#"{DOLSIGN2}"#, None, Action::Currency),
    (
        r#"{ACRONYM}"#,
        Some(
            r#"({SPACENLS})([A]bout|[A]ccording|[A]dditionally|[A]fter|[A]n|[A]|[A]s|[A]t|[B]ut|[E]arlier|[H]e|[H]er|[H]ere|[H]owever|[I]f|[I]n|[I]t|[L]ast|[M]any|[M]ore|[M]r\.|[M]s\.|[N]ow|[O]nce|[O]ne|[O]ther|[O]ur|[S]he|[S]ince|[S]o|[S]ome|[S]uch|[T]hat|[T]he|[T]heir|[T]hen|[T]here|[T]hese|[T]hey|[T]his|[W]e|[W]hen|[W]hile|[W]hat|[Y]et|[Y]ou|{SGML}){SPACENL}"#,
        ),
        Action::Acronym,
    ),
    (r#"{ABBREV3}"#, Some(r#"{SPACENL}?[:digit:]"#), Action::Same),
    (
        r#"(pt[eyEY]|co)\."#,
        Some(r#"{SPACE}(ltd|lim)"#),
        Action::Same,
    ),
    (r#"{ABBREV1}"#, Some(r#"{SENTEND}"#), Action::AbbrevPeriod),
    (r#"{ABBREV1}"#, Some(r#"[^][^]"#), Action::Same),
    (r#"{ABBREV1}"#, None, Action::AbbrevPeriod),
    (r#"{ABBREV2}"#, None, Action::Same),
    (r#"{ABBREV4}"#, Some(r#"{SPACE}"#), Action::Same),
    (r#"{ACRO}"#, Some(r#"{SPACENL}"#), Action::Same),
    (r#"{TBSPEC2}"#, Some(r#"{SPACENL}"#), Action::Same),
    (r#"{FILENAME}"#, Some(r#"({SPACENL}|[.?!,])"#), Action::Same),
    (r#"{WORD}\."#, Some(r#"{INSENTP}"#), Action::SoftHyphens),
    (r#"{PHONE}"#, None, Action::Phone),
    (
        r#"{DBLQUOT}"#,
        Some(r#"[A-Za-z0-9$]"#),
        Action::Quotes(true),
    ),
    (r#"{DBLQUOT}"#, None, Action::Quotes(false)),
    (r#"\x7f"#, None, Action::Skip),
    (r#"{LESSTHAN}"#, None, Action::Fixed("<")),
    (r#"{GREATERTHAN}"#, None, Action::Fixed(">")),
    (r#"{SMILEY}"#, Some(r#"[^A-Za-z0-9]"#), Action::Parens),
    (r#"{ASIANSMILEY}"#, None, Action::Parens),
    (r#"\{"#, None, Action::Fixed("-LCB-")),
    (r#"\}"#, None, Action::Fixed("-RCB-")),
    (r#"\["#, None, Action::Fixed("-LSB-")),
    (r#"\]"#, None, Action::Fixed("-RSB-")),
    (r#"\("#, None, Action::Fixed("-LRB-")),
    (r#"\)"#, None, Action::Fixed("-RRB-")),
    (r#"{HYPHENS}"#, None, Action::Hyphens),
    (r#"{LDOTS}"#, None, Action::Ellipsis),
    (r#"{FNMARKS}"#, None, Action::Same),
    (r#"{ASTS}"#, None, Action::Same),
    (r#"{INSENTP}"#, None, Action::Same),
    (r#"[?!]+"#, None, Action::Same),
    (
        r#"[.¡¿\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA\u3002]"#,
        None,
        Action::Same,
    ),
    (r#"="#, None, Action::Same),
    (r#"\/"#, None, Action::Same),
    (r#"{HTHING}\."#, Some(r#"{INSENTP}"#), Action::SoftHyphens),
    (r#"{HTHING}"#, None, Action::SoftHyphens),
    (r#"{THING}\."#, Some(r#"{INSENTP}"#), Action::Same),
    (r#"{THING}"#, None, Action::Same),
    (r#"{THINGA}\."#, Some(r#"{INSENTP}"#), Action::Amp),
    (r#"{THINGA}"#, None, Action::Amp),
    (
        r#"'"#,
        Some(r#"[A-Za-z][^ \t\n\r\u00A0]"#),
        Action::Quotes(true),
    ),
    (r#"{REDAUX}"#, None, Action::Quotes(false)),
    (r#"{SREDAUX}"#, None, Action::Quotes(false)),
    (r#"{QUOTES}"#, None, Action::Quotes(false)),
    (r#"{FAKEDUCKFEET}"#, None, Action::Same),
    (r#"{MISCSYMBOL}"#, None, Action::Same),
    (
        r#"\0|{SPACES}|[\u200B\u200E-\u200F\uFEFF]"#,
        None,
        Action::Skip,
    ),
    (r#"{NEWLINE}"#, None, Action::Newline),
    (r#"&nbsp;"#, None, Action::Skip),
    // Untokenizable characters: deleted (CoreNLP's default, with a warning).
    (r#"."#, None, Action::Skip),
];

/// A JFlex regular expression in the `regex` crate's syntax: macros expanded, `%caseless`
/// letters as `[xX]`, every other literal character written as `\x{…}`.
fn translate(src: &str, macros: &HashMap<&str, &str>) -> String {
    let cs: Vec<char> = src.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < cs.len() {
        let c = cs[i];
        match c {
            '{' => {
                let j = i + cs[i..].iter().position(|&c| c == '}').expect("closed {");
                let inner: String = cs[i + 1..j].iter().collect();
                if inner.starts_with(|c: char| c.is_ascii_digit()) {
                    out.push_str(&format!("{{{inner}}}"));
                } else {
                    let m = macros.get(inner.as_str()).expect("a PTBLexer macro");
                    out.push_str(&format!("(?:{})", translate(m, macros)));
                }
                i = j + 1;
            }
            '[' => {
                let (class, n) = class(&cs[i..]);
                out.push_str(&class);
                i += n;
            }
            '\\' => {
                let (c, n) = escape(&cs[i..]);
                literal(c, &mut out);
                i += n;
            }
            '.' => {
                out.push_str(r"[^\n]");
                i += 1;
            }
            '(' | ')' | '|' | '*' | '+' | '?' => {
                out.push(c);
                i += 1;
            }
            _ => {
                literal(c, &mut out);
                i += 1;
            }
        }
    }
    out
}

/// A literal character under `%caseless`.
fn literal(c: char, out: &mut String) {
    if c.is_ascii_alphabetic() {
        out.push_str(&format!(
            "[{}{}]",
            c.to_ascii_lowercase(),
            c.to_ascii_uppercase()
        ));
    } else {
        out.push_str(&format!("\\x{{{:X}}}", c as u32));
    }
}

/// An escape at the start of `cs`: the character and how many chars it took.
fn escape(cs: &[char]) -> (char, usize) {
    let hex = |n: usize| {
        let h: String = cs[2..2 + n].iter().collect();
        char::from_u32(u32::from_str_radix(&h, 16).expect("hex escape")).expect("a character")
    };
    match cs[1] {
        'u' => (hex(4), 6),
        'x' => (hex(2), 4),
        'n' => ('\n', 2),
        'r' => ('\r', 2),
        't' => ('\t', 2),
        'f' => ('\u{000C}', 2),
        '0' => ('\0', 2),
        c => (c, 2),
    }
}

/// A predefined class (`[:letter:]` is Java's `isLetter`, …) in the `regex` crate's syntax.
fn predefined(name: &str) -> &'static str {
    match name {
        "letter" => r"\p{L}",
        "digit" => r"\p{Nd}",
        "uppercase" => r"\p{Lu}",
        "lowercase" => r"\p{Ll}",
        other => panic!("predefined class [:{other}:]"),
    }
}

/// `[:name:]` at the start of `cs`: the name and its length in chars.
fn predefined_at(cs: &[char]) -> Option<(String, usize)> {
    if cs.len() < 4 || cs[0] != '[' || cs[1] != ':' {
        return None;
    }
    let j = 2 + cs[2..].iter().position(|c| !c.is_ascii_lowercase())?;
    (j > 2 && cs.get(j) == Some(&':') && cs.get(j + 1) == Some(&']'))
        .then(|| (cs[2..j].iter().collect(), j + 2))
}

/// A character class at the start of `cs` (`[^]` is any character; `%caseless` does not
/// reach inside classes): the translation and how many chars it took.
fn class(cs: &[char]) -> (String, usize) {
    if let Some((name, n)) = predefined_at(cs) {
        return (predefined(&name).to_string(), n);
    }
    if cs[1] == '^' && cs[2] == ']' {
        return (r"(?s:.)".to_string(), 3);
    }
    let mut out = String::from("[");
    let mut i = 1;
    if cs[i] == '^' {
        out.push('^');
        i += 1;
    }
    while cs[i] != ']' {
        if let Some((name, n)) = predefined_at(&cs[i..]) {
            out.push_str(predefined(&name));
            i += n;
            continue;
        }
        let (c, n) = if cs[i] == '\\' {
            escape(&cs[i..])
        } else {
            (cs[i], 1)
        };
        i += n;
        out.push_str(&format!("\\x{{{:X}}}", c as u32));
        // A range, unless the `-` is the last character of the class.
        if cs[i] == '-' && cs[i + 1] != ']' {
            let (d, m) = if cs[i + 1] == '\\' {
                escape(&cs[i + 1..])
            } else {
                (cs[i + 1], 1)
            };
            out.push_str(&format!("-\\x{{{:X}}}", d as u32));
            i += 1 + m;
        }
    }
    out.push(']');
    (out, i + 1)
}

/// The compiled rules: one DFA over every rule with its trailing context (for the longest
/// match), and each rule's parts on their own (to split a match into token and context).
struct Lexer {
    dfa: DFA,
    cache: std::sync::Mutex<Cache>,
    parts: Vec<Option<(regex::Regex, regex::Regex)>>,
}

fn lexer() -> &'static Lexer {
    static LEXER: OnceLock<Lexer> = OnceLock::new();
    LEXER.get_or_init(|| {
        let macros: HashMap<&str, &str> = MACROS.iter().copied().collect();
        let whole = |r: &str| regex::Regex::new(&format!("^(?:{r})$")).expect("valid rule");
        let mut patterns = Vec::new();
        let mut parts = Vec::new();
        for (main, context, _) in RULES {
            let m = translate(main, &macros);
            match context {
                Some(c) => {
                    let c = translate(c, &macros);
                    patterns.push(format!("(?:{m})(?:{c})"));
                    parts.push(Some((whole(&m), whole(&c))));
                }
                None => {
                    patterns.push(m);
                    parts.push(None);
                }
            }
        }
        let dfa = DFA::builder()
            .configure(
                DFA::config()
                    .match_kind(MatchKind::All)
                    .cache_capacity(64 << 20),
            )
            .build_many(&patterns)
            .expect("PTBLexer rules compile");
        let cache = std::sync::Mutex::new(dfa.create_cache());
        Lexer { dfa, cache, parts }
    })
}

impl Lexer {
    /// The rule JFlex picks at `pos` and the end of its match (trailing context included):
    /// the longest match, the earliest rule on a tie.
    fn longest(&self, text: &str, pos: usize) -> (usize, usize) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let input = Input::new(text).range(pos..).anchored(Anchored::Yes);
        let mut state = OverlappingState::start();
        let mut best: Option<(usize, usize)> = None;
        loop {
            self.dfa
                .try_search_overlapping_fwd(&mut cache, &input, &mut state)
                .expect("the lexer's DFA searches");
            let Some(m) = state.get_match() else { break };
            let (rule, end) = (m.pattern().as_usize(), m.offset());
            best = match best {
                Some((r, e)) if e > end || (e == end && r < rule) => Some((r, e)),
                _ => Some((rule, end)),
            };
        }
        best.expect("`.` and `{NEWLINE}` match any character")
    }

    fn lex(&self, text: &str) -> Vec<Token> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < text.len() {
            let (rule, end) = self.longest(text, pos);
            // r1/r2: the longest r1 whose rest matches r2 (JFlex's general lookahead).
            let end = match &self.parts[rule] {
                None => end,
                Some((r1, r2)) => (pos + 1..end)
                    .rev()
                    .filter(|&p| text.is_char_boundary(p))
                    .find(|&p| r1.is_match(&text[pos..p]) && r2.is_match(&text[p..end]))
                    .expect("a split of a trailing-context match"),
            };
            let tok = &text[pos..end];
            // Chars given back to the input (yypushback).
            let back = |n: usize| tok.char_indices().rev().nth(n - 1).map_or(0, |(i, _)| i);
            let (word, next) = match RULES[rule].2 {
                Action::Same => (Some(tok.to_string()), end),
                Action::SoftHyphens => (Some(soft_hyphens(tok)), end),
                Action::PushBack(n) => {
                    let keep = back(n);
                    (Some(tok[..keep].to_string()), pos + keep)
                }
                Action::Nbsp => (Some(tok.replace(' ', "\u{00A0}")), end),
                Action::Dash => (Some("--".into()), end),
                Action::Amp => (Some(amp(tok)), end),
                Action::Quotes(left) => (Some(quotes(tok, left)), end),
                Action::Fraction => (Some(fraction(tok)), end),
                Action::Currency => (Some(currency(tok)), end),
                Action::Acronym => {
                    let keep = back(1);
                    if tok.chars().count() == 2 {
                        (Some(tok[..keep].to_string()), pos + keep)
                    } else {
                        (Some(tok.to_string()), pos + keep)
                    }
                }
                Action::AbbrevPeriod => (Some(tok.to_string()), pos + back(1)),
                Action::Phone => (
                    Some(
                        tok.replace(' ', "\u{00A0}")
                            .replace('(', "-LRB-")
                            .replace(')', "-RRB-"),
                    ),
                    end,
                ),
                Action::Parens => (Some(tok.replace('(', "-LRB-").replace(')', "-RRB-")), end),
                Action::Fixed(s) => (Some(s.to_string()), end),
                Action::Hyphens => {
                    let n = tok.chars().count();
                    let t = if (3..=4).contains(&n) { "--" } else { tok };
                    (Some(t.to_string()), end)
                }
                Action::Ellipsis => (Some("...".into()), end),
                Action::Skip => (None, end),
                Action::Newline => {
                    out.push(Token::Newline);
                    (None, end)
                }
            };
            if let Some(w) = word {
                out.push(Token::Word(w));
            }
            pos = next;
        }
        out
    }
}

fn soft_hyphens(s: &str) -> String {
    let t: String = s.chars().filter(|&c| c != '\u{00AD}').collect();
    if t.is_empty() {
        "-".into()
    } else {
        t
    }
}

/// `(?i:&amp;)` → `&`.
fn amp(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.to_ascii_lowercase().find("&amp;") {
        out.push_str(&rest[..i]);
        out.push('&');
        rest = &rest[i + 5..];
    }
    out.push_str(rest);
    out
}

/// CoreNLP's `latexQuotes`.
fn quotes(s: &str, left: bool) -> String {
    let (single, double) = if left { ("`", "``") } else { ("'", "''") };
    let s = s.replace("&apos;", single).replace('\'', single);
    let s = s.replace('"', double).replace("&quot;", double);
    s.chars()
        .map(|c| match c {
            '\u{0091}' | '\u{2018}' | '\u{201B}' | '\u{2039}' => "`".to_string(),
            '\u{0092}' | '\u{2019}' | '\u{203A}' => "'".to_string(),
            '\u{0093}' | '\u{201C}' | '\u{00AB}' => "``".to_string(),
            '\u{0094}' | '\u{201D}' | '\u{00BB}' => "''".to_string(),
            c => c.to_string(),
        })
        .collect()
}

fn fraction(s: &str) -> String {
    s.replace('\u{00BC}', "1/4")
        .replace('\u{00BD}', "1/2")
        .replace('\u{00BE}', "3/4")
        .replace('\u{2153}', "1/3")
        .replace('\u{2154}', "2/3")
}

fn currency(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\u{00A2}' => "cents".to_string(),
            '\u{00A3}' => "#".to_string(),
            '\u{0080}' | '\u{00A4}' | '\u{20A0}' | '\u{20AC}' => "$".to_string(),
            c => c.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{tokenize, tokenize_lines};

    /// CoreNLP sees the next caption: `I.` before `The …` is a sentence end (checked with the
    /// Java tokenizer: `a vitamin i .` / `a vitamin i.`).
    #[test]
    fn the_next_line_counts() {
        let lines = ["a vitamin I.", "The dog", "a vitamin I.", "the dog"];
        assert_eq!(
            tokenize_lines(&lines),
            ["a vitamin i", "the dog", "a vitamin i.", "the dog"]
        );
    }

    /// A tag whose quoted attribute would run from one caption into the next does not move the
    /// later captions onto other images.
    #[test]
    fn no_token_spans_two_captions() {
        let lines = ["a <a b='", "x", "'> dog", "two cats"];
        let got = tokenize_lines(&lines);
        assert_eq!(got.len(), 4);
        assert_eq!(got[3], "two cats");
        assert_eq!(got[1], "x");
    }

    #[test]
    fn corners() {
        assert_eq!(
            tokenize("A man's dog doesn't like the cat's toy."),
            "a man 's dog does n't like the cat 's toy"
        );
        assert_eq!(
            tokenize("It's 3:30 p.m. and the U.S. flag is up!"),
            "it 's 3:30 p.m. and the u.s. flag is up"
        );
        assert_eq!(
            tokenize("Cannot (or won't) eat the cake: 100% sure"),
            "can not -lrb- or wo n't -rrb- eat the cake 100 % sure"
        );
        assert_eq!(
            tokenize("The price is $3.50, isn't it?"),
            "the price is $ 3.50 is n't it"
        );
        assert_eq!(tokenize("Dogs' toys"), "dogs toys");
        assert_eq!(
            tokenize("She said \"hello\" -- then left..."),
            "she said hello then left"
        );
        assert_eq!(tokenize(""), "");
    }
}
