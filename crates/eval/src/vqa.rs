//! Question-answering metrics as big_vision's PaliGemma evaluators compute them:
//! VQAv2 accuracy (official answer normalisation, leave-one-out over the annotators), simple VQA
//! accuracy / exact match, ANLS (θ = 0.5) and ChartQA's relaxed accuracy (±5 %).

/// Whitespace clean-up applied to every answer before anything else.
fn strip_space(s: &str) -> String {
    s.replace(['\n', '\t'], " ").trim().to_string()
}

/// Punctuation the official VQA evaluation removes or turns into spaces.
const PUNCT: [char; 21] = [
    ';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
    '?', '!',
];

/// Number words and contractions without apostrophes, from the official VQA evaluation
/// (`vqaEval.py`; the same table as big_vision's `vqav2.py`). Keys are matched after
/// lower-casing, so the few capitalised keys of the original never match; kept for fidelity.
const REPLACEMENTS: &[(&str, &str)] = &[
    ("aint", "ain't"),
    ("arent", "aren't"),
    ("cant", "can't"),
    ("couldve", "could've"),
    ("couldnt", "couldn't"),
    ("couldn'tve", "couldn't've"),
    ("couldnt've", "couldn't've"),
    ("didnt", "didn't"),
    ("doesnt", "doesn't"),
    ("dont", "don't"),
    ("hadnt", "hadn't"),
    ("hadnt've", "hadn't've"),
    ("hadn'tve", "hadn't've"),
    ("hasnt", "hasn't"),
    ("havent", "haven't"),
    ("hed", "he'd"),
    ("hed've", "he'd've"),
    ("he'dve", "he'd've"),
    ("hes", "he's"),
    ("howd", "how'd"),
    ("howll", "how'll"),
    ("hows", "how's"),
    ("Id've", "I'd've"),
    ("I'dve", "I'd've"),
    ("Im", "I'm"),
    ("Ive", "I've"),
    ("isnt", "isn't"),
    ("itd", "it'd"),
    ("itd've", "it'd've"),
    ("it'dve", "it'd've"),
    ("itll", "it'll"),
    ("let's", "let's"),
    ("maam", "ma'am"),
    ("mightnt", "mightn't"),
    ("mightnt've", "mightn't've"),
    ("mightn'tve", "mightn't've"),
    ("mightve", "might've"),
    ("mustnt", "mustn't"),
    ("mustve", "must've"),
    ("neednt", "needn't"),
    ("notve", "not've"),
    ("oclock", "o'clock"),
    ("oughtnt", "oughtn't"),
    ("ow's'at", "'ow's'at"),
    ("'ows'at", "'ow's'at"),
    ("'ow'sat", "'ow's'at"),
    ("shant", "shan't"),
    ("shed've", "she'd've"),
    ("she'dve", "she'd've"),
    ("she's", "she's"),
    ("shouldve", "should've"),
    ("shouldnt", "shouldn't"),
    ("shouldnt've", "shouldn't've"),
    ("shouldn'tve", "shouldn't've"),
    ("somebody'd", "somebodyd"),
    ("somebodyd've", "somebody'd've"),
    ("somebody'dve", "somebody'd've"),
    ("somebodyll", "somebody'll"),
    ("somebodys", "somebody's"),
    ("someoned", "someone'd"),
    ("someoned've", "someone'd've"),
    ("someone'dve", "someone'd've"),
    ("someonell", "someone'll"),
    ("someones", "someone's"),
    ("somethingd", "something'd"),
    ("somethingd've", "something'd've"),
    ("something'dve", "something'd've"),
    ("somethingll", "something'll"),
    ("thats", "that's"),
    ("thered", "there'd"),
    ("thered've", "there'd've"),
    ("there'dve", "there'd've"),
    ("therere", "there're"),
    ("theres", "there's"),
    ("theyd", "they'd"),
    ("theyd've", "they'd've"),
    ("they'dve", "they'd've"),
    ("theyll", "they'll"),
    ("theyre", "they're"),
    ("theyve", "they've"),
    ("twas", "'twas"),
    ("wasnt", "wasn't"),
    ("wed've", "we'd've"),
    ("we'dve", "we'd've"),
    ("weve", "we've"),
    ("werent", "weren't"),
    ("whatll", "what'll"),
    ("whatre", "what're"),
    ("whats", "what's"),
    ("whatve", "what've"),
    ("whens", "when's"),
    ("whered", "where'd"),
    ("wheres", "where's"),
    ("whereve", "where've"),
    ("whod", "who'd"),
    ("whod've", "who'd've"),
    ("who'dve", "who'd've"),
    ("wholl", "who'll"),
    ("whos", "who's"),
    ("whove", "who've"),
    ("whyll", "why'll"),
    ("whyre", "why're"),
    ("whys", "why's"),
    ("wont", "won't"),
    ("wouldve", "would've"),
    ("wouldnt", "wouldn't"),
    ("wouldnt've", "wouldn't've"),
    ("wouldn'tve", "wouldn't've"),
    ("yall", "y'all"),
    ("yall'll", "y'all'll"),
    ("y'allll", "y'all'll"),
    ("yall'd've", "y'all'd've"),
    ("y'alld've", "y'all'd've"),
    ("y'all'dve", "y'all'd've"),
    ("youd", "you'd"),
    ("youd've", "you'd've"),
    ("you'dve", "you'd've"),
    ("youll", "you'll"),
    ("youre", "you're"),
    ("youve", "you've"),
    ("none", "0"),
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
];

/// The official VQA answer normalisation (`postprocess_vqav2_text`).
pub fn normalize_vqa(txt: &str) -> String {
    let b = txt.as_bytes();
    // `(\d)(,)(\d)` anywhere: the official code then deletes all punctuation (a bug it keeps).
    let digit_comma = b
        .windows(3)
        .any(|w| w[0].is_ascii_digit() && w[1] == b',' && w[2].is_ascii_digit());
    let mut out = txt.to_string();
    for p in PUNCT {
        let glued = txt.contains(&format!("{p} ")) || txt.contains(&format!(" {p}"));
        out = out.replace(p, if digit_comma || glued { "" } else { " " });
    }
    // `(?!<=\d)(\.)(?!\d)`: the first group is a (mistyped) lookahead that always passes, so
    // every period not followed by a digit goes.
    let chars: Vec<char> = out.chars().collect();
    let out: String = chars
        .iter()
        .enumerate()
        .filter(|(i, c)| **c != '.' || chars.get(i + 1).is_some_and(|n| n.is_ascii_digit()))
        .map(|(_, c)| *c)
        .collect();
    out.to_lowercase()
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .map(|w| {
            REPLACEMENTS
                .iter()
                .find(|(k, _)| *k == w)
                .map_or(w, |(_, v)| v)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// VQAv2 accuracy of one answer: normalisation only when the annotators disagree, then the mean
/// over leave-one-out subsets of `min(#matches / 3, 1)`.
pub fn vqav2_accuracy(prediction: &str, answers: &[String]) -> f64 {
    if answers.is_empty() {
        return 0.0;
    }
    let mut pred = strip_space(prediction);
    let mut gts: Vec<String> = answers.iter().map(|a| strip_space(a)).collect();
    let mut distinct = gts.clone();
    distinct.sort();
    distinct.dedup();
    if distinct.len() > 1 {
        pred = normalize_vqa(&pred);
        gts = gts.iter().map(|a| normalize_vqa(a)).collect();
    }
    let matches: Vec<bool> = gts.iter().map(|g| *g == pred).collect();
    let total = matches.iter().filter(|m| **m).count();
    let sum: f64 = matches
        .iter()
        .map(|m| ((total - usize::from(*m)) as f64 / 3.0).min(1.0))
        .sum();
    sum / gts.len() as f64
}

/// Simple VQA accuracy (big_vision `vqa.py`): exact match against a single answer, or
/// `min(#matches / 3, 1)` against several (no leave-one-out). Returns (accuracy, any-match).
pub fn vqa_accuracy(prediction: &str, answers: &[String], lower: bool) -> (f64, f64) {
    let norm = |s: &str| {
        if lower {
            s.to_lowercase()
        } else {
            s.to_string()
        }
    };
    let pred = norm(prediction);
    let n = answers.iter().filter(|a| norm(a) == pred).count() as f64;
    match answers.len() {
        0 => (0.0, 0.0),
        1 => (n, n),
        _ => ((n / 3.0).min(1.0), n.min(1.0)),
    }
}

/// Levenshtein distance over Unicode scalar values.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let sub = prev[j - 1] + usize::from(a[i - 1] != b[j - 1]);
            cur[j] = sub.min(prev[j] + 1).min(cur[j - 1] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// ANLS of one answer against one target (θ = 0.5): `1 − NL` when the normalised Levenshtein
/// distance NL is below θ, else 0; an empty target only matches an empty answer.
pub fn anls(target: &str, prediction: &str) -> f64 {
    if target.is_empty() {
        return f64::from(u8::from(prediction.is_empty()));
    }
    let d = edit_distance(target, prediction) as f64;
    let nl = d / target.chars().count().max(prediction.chars().count()) as f64;
    if nl < 0.5 {
        1.0 - nl
    } else {
        0.0
    }
}

/// Best ANLS over several targets.
pub fn anls_max(prediction: &str, answers: &[String]) -> f64 {
    answers
        .iter()
        .map(|a| anls(a, prediction))
        .fold(0.0, f64::max)
}

/// Python's `float()` on a stripped string, with a `%` suffix read as a percentage.
fn to_float(s: &str) -> Option<f64> {
    match s.strip_suffix('%') {
        Some(p) => p
            .trim_end_matches('%')
            .trim()
            .parse::<f64>()
            .ok()
            .map(|v| v / 100.0),
        None => s.trim().parse::<f64>().ok(),
    }
    .filter(|v| v.is_finite())
}

/// ChartQA relaxed match: numbers within 5 % relative error of a non-zero target, otherwise an
/// exact string match.
pub fn relaxed_match(target: &str, prediction: &str) -> bool {
    match (to_float(prediction), to_float(target)) {
        (Some(p), Some(t)) if t != 0.0 => (p - t).abs() / t.abs() <= 0.05,
        _ => prediction == target,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn vqav2_leave_one_out() {
        // 10 annotators, 2 say "two", 8 say "2": "2" matches 8 → every subset ≥ 3 → 1.0.
        let mut gts = vec!["2"; 8];
        gts.extend(["two", "two"]);
        assert_eq!(vqav2_accuracy("2", &s(&gts)), 1.0);
        // After normalisation "two" == "2" too.
        assert_eq!(vqav2_accuracy("two", &s(&gts)), 1.0);
        // Exactly 3 of 10 match: leaving out a matching one gives 2/3 (3 subsets), the other
        // 7 subsets give 1 → (3·2/3 + 7) / 10 = 0.9.
        let gts = s(&[
            "cat", "cat", "cat", "dog", "dog", "dog", "dog", "dog", "dog", "dog",
        ]);
        assert!((vqav2_accuracy("cat", &gts) - 0.9).abs() < 1e-12);
        // One match: 9 subsets give 1/3, the subset without it gives 0 → 0.3.
        let gts = s(&[
            "cat", "dog", "dog", "dog", "dog", "dog", "dog", "dog", "dog", "dog",
        ]);
        assert!((vqav2_accuracy("cat", &gts) - 0.3).abs() < 1e-12);
        assert_eq!(vqav2_accuracy("A Cat.", &gts), vqav2_accuracy("cat", &gts));
    }

    #[test]
    fn vqa_normalisation_rules() {
        assert_eq!(normalize_vqa("The Dog!"), "dog");
        assert_eq!(normalize_vqa("dont know"), "don't know");
        assert_eq!(normalize_vqa("3.5 m."), "3.5 m");
        assert_eq!(normalize_vqa("red-white"), "red white"); // no space around '-': a space
        assert_eq!(normalize_vqa("red - white"), "red white"); // glued: removed
        assert_eq!(normalize_vqa("1,000 yes-no"), "1000 yesno"); // digit comma: all removed
        assert_eq!(normalize_vqa("ten"), "10");
    }

    #[test]
    fn simple_vqa_anls_relaxed() {
        assert_eq!(vqa_accuracy("red", &s(&["red"]), false), (1.0, 1.0));
        assert_eq!(vqa_accuracy("Red", &s(&["red"]), false), (0.0, 0.0));
        assert_eq!(vqa_accuracy("Red", &s(&["red"]), true), (1.0, 1.0));
        let (a, any) = vqa_accuracy("red", &s(&["red", "blue", "red", "green"]), false);
        assert!((a - 2.0 / 3.0).abs() < 1e-12 && any == 1.0);
        assert_eq!(anls("hello", "hello"), 1.0);
        assert!((anls("hello", "hallo") - 0.8).abs() < 1e-12);
        assert_eq!(anls("hello", "xyz"), 0.0);
        assert_eq!(anls("", ""), 1.0);
        assert!((anls_max("hallo", &s(&["zzzzzz", "hello"])) - 0.8).abs() < 1e-12);
        assert!(relaxed_match("100", "104.9"));
        assert!(!relaxed_match("100", "105.1"));
        assert!(relaxed_match("50%", "0.51"));
        assert!(!relaxed_match("0", "0.0"));
        assert!(relaxed_match("0", "0"));
        assert!(relaxed_match("Yes", "Yes") && !relaxed_match("Yes", "yes"));
    }
}
