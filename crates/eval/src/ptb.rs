//! The caption tokenisation of pycocoevalcap: Stanford CoreNLP's `PTBTokenizer -preserveLines
//! -lowerCase`, then punctuation tokens dropped.
//!
//! This is a re-implementation of the parts of the PTB rules that captions meet (contractions,
//! possessives, brackets, quotes, sentence-final periods vs abbreviations, `$`/`%`, ellipses); it
//! agrees with the Java tokenizer on every string of `tests/fixtures/eval/reference.json`.
//! One quirk is kept on purpose: CoreNLP writes brackets as `-LRB-`…, lower-cased to `-lrb-`,
//! which pycocoevalcap's (upper-case) punctuation list then fails to drop.

/// Tokens pycocoevalcap removes after tokenising (compared case-sensitively, as it does).
const PUNCTUATION: [&str; 17] = [
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
    "...", ";",
];

/// Abbreviations that keep their period (CoreNLP's list, the ones captions use).
const ABBREVIATIONS: [&str; 24] = [
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "inc", "ltd", "co", "corp", "vs", "etc",
    "mt", "ft", "no", "jan", "feb", "aug", "sept", "oct", "nov", "dec",
];

/// Tokenises one caption the way pycocoevalcap does and joins the tokens with single spaces.
pub fn tokenize(text: &str) -> String {
    let lower = text.replace(['\n', '\r'], " ").to_lowercase();
    let mut out: Vec<String> = Vec::new();
    for chunk in lower.split_whitespace() {
        split_chunk(chunk, &mut out);
    }
    out.retain(|t| !PUNCTUATION.contains(&t.as_str()));
    out.join(" ")
}

/// PTB's names for brackets.
fn bracket(c: char) -> Option<&'static str> {
    Some(match c {
        '(' => "-lrb-",
        ')' => "-rrb-",
        '[' => "-lsb-",
        ']' => "-rsb-",
        '{' => "-lcb-",
        '}' => "-rcb-",
        _ => return None,
    })
}

fn split_chunk(chunk: &str, out: &mut Vec<String>) {
    let mut s = chunk;
    // Leading punctuation: quotes, brackets, currency.
    loop {
        if let Some(r) = s.strip_prefix("--") {
            out.push("--".into());
            s = r;
            continue;
        }
        let Some(c) = s.chars().next() else { return };
        if let Some(b) = bracket(c) {
            out.push(b.into());
        } else if c == '"' {
            out.push("``".into());
        } else if c == '\'' && s.len() > 1 && !is_clitic(s) {
            out.push("`".into());
        } else if matches!(c, '$' | '#' | '`') && s.len() > 1 {
            out.push(c.to_string());
        } else {
            break;
        }
        s = &s[c.len_utf8()..];
    }
    // Trailing punctuation, collected in reverse.
    let mut tail: Vec<String> = Vec::new();
    loop {
        if s.is_empty() {
            break;
        }
        if let Some(r) = s.strip_suffix("...") {
            tail.push("...".into());
            s = r;
            continue;
        }
        if let Some(r) = s.strip_suffix("--") {
            tail.push("--".into());
            s = r;
            continue;
        }
        let c = s.chars().next_back().unwrap();
        let rest = &s[..s.len() - c.len_utf8()];
        if let Some(b) = bracket(c) {
            tail.push(b.into());
        } else if c == '"' {
            tail.push("''".into());
        } else if matches!(c, ',' | ';' | ':' | '!' | '?' | '%') && !rest.is_empty() {
            tail.push(c.to_string());
        } else if c == '\'' && !rest.is_empty() {
            tail.push("'".into());
        } else if c == '.' && !rest.is_empty() && !is_abbreviation(rest) {
            tail.push(".".into());
        } else {
            break;
        }
        s = rest;
    }
    if !s.is_empty() {
        split_word(s, out);
    }
    out.extend(tail.into_iter().rev());
}

/// `'s`, `'re`… at the start of a chunk are clitics, not opening quotes.
fn is_clitic(s: &str) -> bool {
    ["'s", "'re", "'ve", "'ll", "'d", "'m"]
        .iter()
        .any(|c| s.strip_prefix(c).is_some_and(|r| r.is_empty()))
}

fn is_abbreviation(word: &str) -> bool {
    // "a.m", "u.s", "e.g": a period inside the word; or a known title/abbreviation.
    (word.contains('.') && word.chars().any(|c| c.is_alphabetic())) || ABBREVIATIONS.contains(&word)
}

/// Splits contractions and possessives: `doesn't` → `does n't`, `cat's` → `cat 's`,
/// `cannot` → `can not`.
fn split_word(w: &str, out: &mut Vec<String>) {
    if w == "cannot" {
        out.extend(["can".to_string(), "not".to_string()]);
        return;
    }
    for (word, a, b) in [
        ("gonna", "gon", "na"),
        ("gotta", "got", "ta"),
        ("wanna", "wan", "na"),
    ] {
        if w == word {
            out.extend([a.to_string(), b.to_string()]);
            return;
        }
    }
    if let Some(stem) = w.strip_suffix("n't") {
        if !stem.is_empty() {
            out.push(stem.to_string());
            out.push("n't".into());
            return;
        }
    }
    for clitic in ["'s", "'re", "'ve", "'ll", "'d", "'m"] {
        if let Some(stem) = w.strip_suffix(clitic) {
            if !stem.is_empty() && stem.chars().last().is_some_and(|c| c.is_alphanumeric()) {
                out.push(stem.to_string());
                out.push(clitic.to_string());
                return;
            }
        }
    }
    out.push(w.to_string());
}

#[cfg(test)]
mod tests {
    use super::tokenize;

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
