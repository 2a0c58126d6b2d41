//! ShapesWorld: procedurally rendered images whose objects are known exactly (the project's embedded default
//! world and hallucination yardstick; see DESIGN.md). Everything is a pure function of a u64 seed.
//!
//! A scene holds 1..=max_objects non-overlapping objects, each a colour and a shape from fixed vocabularies.
//! Objects co-occur: each object has a fixed "partner" that is added to the scene with probability
//! `partner_prob` when the object is present, which makes partners the natural adversarial (POPE) negatives
//! and the natural hallucinations of a model trained on noisy captions.

use crate::rng::SplitMix64;
use image::{Rgb, RgbImage};

pub const COLORS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [235, 205, 40]),
    ("purple", [140, 60, 180]),
    ("orange", [240, 130, 30]),
];
pub const SHAPES: [&str; 5] = ["circle", "square", "triangle", "diamond", "cross"];

/// Every object phrase ("red circle", ...), colour-major.
pub fn vocabulary() -> Vec<String> {
    COLORS.iter().flat_map(|(c, _)| SHAPES.iter().map(move |s| format!("{c} {s}"))).collect()
}

/// Index of an object in `vocabulary()`.
fn object_index(color: usize, shape: usize) -> usize {
    color * SHAPES.len() + shape
}

/// The object that co-occurs with `obj`: a different colour and shape, fixed for the world.
pub fn partner(obj: usize) -> usize {
    let (c, s) = (obj / SHAPES.len(), obj % SHAPES.len());
    object_index((c + 1) % COLORS.len(), (s + 2) % SHAPES.len())
}

/// How often each object is drawn as a scene's first object (some objects are "popular").
fn popularity(obj: usize) -> f64 {
    // A fixed, skewed prior: weight 1 + (obj * 7 mod 5), normalised by the caller.
    1.0 + ((obj * 7) % 5) as f64
}

/// The objects ordered from most to least popular (POPE's "popular" negatives come first).
pub fn popular_order() -> Vec<usize> {
    let mut v: Vec<usize> = (0..COLORS.len() * SHAPES.len()).collect();
    v.sort_by(|&a, &b| popularity(b).total_cmp(&popularity(a)).then(a.cmp(&b)));
    v
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Object {
    /// "red circle"
    pub phrase: String,
    pub color: usize,
    pub shape: usize,
    /// Centre (pixels) and radius of the bounding circle.
    pub x: f32,
    pub y: f32,
    pub r: f32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Scene {
    pub objects: Vec<Object>,
    pub size: u32,
    pub grid: u32,
}

#[derive(Clone, Debug)]
pub struct WorldConfig {
    /// Image side in pixels.
    pub size: u32,
    pub max_objects: usize,
    pub partner_prob: f64,
    /// Background noise amplitude (0..255 scale).
    pub noise: f32,
    /// Objects sit in distinct cells of a grid x grid layout, with jittered centres and sizes. A ViT whose
    /// patch is one cell (64 px / 4 = 16 px) then sees each object whole in one patch, which is what lets a
    /// model this small learn to see from a few thousand images.
    pub grid: u32,
}

impl Default for WorldConfig {
    fn default() -> Self {
        WorldConfig { size: 64, max_objects: 4, partner_prob: 0.6, noise: 6.0, grid: 4 }
    }
}

fn pick_weighted(rng: &mut SplitMix64, weights: &[f64]) -> usize {
    let total: f64 = weights.iter().sum();
    let mut u = rng.next_f64() * total;
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i;
        }
        u -= w;
    }
    weights.len() - 1
}

impl Scene {
    /// The scene of `seed`: deterministic.
    pub fn generate(cfg: &WorldConfig, seed: u64) -> Scene {
        let mut rng = SplitMix64::new(seed ^ 0x5348_4150_4553_0001);
        let n_objects = COLORS.len() * SHAPES.len();
        let want = 1 + (rng.next_u64() % cfg.max_objects.max(1) as u64) as usize;
        let weights: Vec<f64> = (0..n_objects).map(popularity).collect();
        let mut chosen: Vec<usize> = Vec::new();
        while chosen.len() < want {
            // Partners of objects already present come in first; otherwise a popularity-weighted draw.
            let next = chosen
                .iter()
                .map(|&o| partner(o))
                .find(|p| !chosen.contains(p) && rng.next_f64() < cfg.partner_prob)
                .unwrap_or_else(|| pick_weighted(&mut rng, &weights));
            if !chosen.contains(&next) {
                chosen.push(next);
            }
        }
        // One object per grid cell: a random free cell, radius 0.30..0.43 of the cell, centre jittered so the
        // object stays at least a pixel inside its cell (objects never touch).
        let grid = cfg.grid.max(1);
        let cell = cfg.size as f32 / grid as f32;
        let mut free: Vec<u32> = (0..grid * grid).collect();
        let mut objects: Vec<Object> = Vec::new();
        for obj in chosen {
            if free.is_empty() {
                break;
            }
            let id = free.swap_remove((rng.next_u64() % free.len() as u64) as usize);
            let (cx, cy) = ((id % grid) as f32, (id / grid) as f32);
            let r = cell * (0.30 + 0.13 * rng.next_f64() as f32);
            let slack = (cell / 2.0 - r - 1.0).max(0.0);
            let x = (cx + 0.5) * cell + slack * (2.0 * rng.next_f64() as f32 - 1.0);
            let y = (cy + 0.5) * cell + slack * (2.0 * rng.next_f64() as f32 - 1.0);
            let (color, shape) = (obj / SHAPES.len(), obj % SHAPES.len());
            objects.push(Object { phrase: format!("{} {}", COLORS[color].0, SHAPES[shape]), color, shape, x, y, r });
        }
        Scene { objects, size: cfg.size, grid }
    }

    pub fn phrases(&self) -> Vec<String> {
        self.objects.iter().map(|o| o.phrase.clone()).collect()
    }

    /// Renders the scene: mild background noise, shapes anti-aliased by 4x4 supersampling.
    pub fn render(&self, cfg: &WorldConfig, seed: u64) -> RgbImage {
        let mut rng = SplitMix64::new(seed ^ 0x4e4f_4953_4500_0002);
        let n = self.size;
        let mut img = RgbImage::new(n, n);
        for p in img.pixels_mut() {
            let v = (200.0 + cfg.noise * (rng.next_f64() as f32 * 2.0 - 1.0)).clamp(0.0, 255.0) as u8;
            *p = Rgb([v, v, v]);
        }
        const SS: usize = 4;
        for o in &self.objects {
            let col = COLORS[o.color].1;
            let (x0, x1) = ((o.x - o.r - 1.0).floor().max(0.0) as u32, ((o.x + o.r + 1.0).ceil() as u32).min(n - 1));
            let (y0, y1) = ((o.y - o.r - 1.0).floor().max(0.0) as u32, ((o.y + o.r + 1.0).ceil() as u32).min(n - 1));
            for py in y0..=y1 {
                for px in x0..=x1 {
                    let mut hits = 0;
                    for sy in 0..SS {
                        for sx in 0..SS {
                            let fx = px as f32 + (sx as f32 + 0.5) / SS as f32;
                            let fy = py as f32 + (sy as f32 + 0.5) / SS as f32;
                            if inside(o.shape, (fx - o.x) / o.r, (fy - o.y) / o.r) {
                                hits += 1;
                            }
                        }
                    }
                    if hits > 0 {
                        let a = hits as f32 / (SS * SS) as f32;
                        let p = img.get_pixel_mut(px, py);
                        for (v, &c) in p.0.iter_mut().zip(&col) {
                            *v = (a * c as f32 + (1.0 - a) * *v as f32).round() as u8;
                        }
                    }
                }
            }
        }
        img
    }
}

/// Whether the point (u, v), in units of the object's radius around its centre, is inside the shape.
pub fn inside(shape: usize, u: f32, v: f32) -> bool {
    match SHAPES[shape] {
        "circle" => u * u + v * v <= 0.9 * 0.9,
        "square" => u.abs() <= 0.7 && v.abs() <= 0.7,
        // Upward triangle: apex at v = -0.9 (image y grows downwards), base at v = 0.5, half-width 0.78.
        "triangle" => (-0.9..=0.5).contains(&v) && u.abs() <= 0.78 * (v + 0.9) / 1.4,
        "diamond" => u.abs() + v.abs() <= 0.9,
        _ => (u.abs() <= 0.28 && v.abs() <= 0.85) || (v.abs() <= 0.28 && u.abs() <= 0.85),
    }
}

/// An instruction about a scene with its exact answer.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Instruction {
    /// caption | existence | count | attribute
    pub kind: &'static str,
    pub prompt: String,
    /// Exact answer (for captions: the clean object list; "yes"/"no" for existence).
    pub answer: String,
    /// For existence questions: "present", or the POPE negative split "random" | "popular" | "adversarial".
    pub split: Option<&'static str>,
}

/// Captioning phrasings; the first is exactly "Describe the image.".
pub const CAPTION_PROMPTS: [&str; 4] =
    ["Describe the image.", "What is in this picture?", "List the objects you see.", "Describe this image in detail."];

/// The scene's objects in reading order (grid rows top to bottom, left to right within a row), the order
/// captions list them in.
pub fn reading_order(scene: &Scene) -> Vec<&Object> {
    let cell = scene.size as f32 / scene.grid.max(1) as f32;
    let row = |o: &Object| (o.y / cell).floor() as i64;
    let mut v: Vec<&Object> = scene.objects.iter().collect();
    v.sort_by(|a, b| row(a).cmp(&row(b)).then(a.x.total_cmp(&b.x)));
    v
}

/// The order a caption lists objects in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptionOrder {
    /// Vocabulary order (colour-major): what is present decides the caption, not where it is, which a small
    /// model learns far sooner than a spatial scan.
    Canonical,
    /// Reading order (see `reading_order`).
    Reading,
}

/// A clean caption naming every object in vocabulary order, e.g. "There is a red circle and a blue square."
pub fn caption(scene: &Scene) -> String {
    noisy_caption(scene, 0, 0.0, CaptionOrder::Canonical).0
}

/// How often captions name an object's absent partner, relative to the caption noise: half the objects co-occur
/// strongly (1.0), half weakly (0.2). The split makes a model trained on noisy captions hallucinate after some
/// objects and not others, as real models do.
pub fn cooccurrence_strength(obj: usize) -> f64 {
    if (obj / SHAPES.len() + obj % SHAPES.len()).is_multiple_of(2) {
        1.0
    } else {
        0.2
    }
}

/// A caption with the noise of detailed-caption data: after each present object (reading order) whose partner is
/// absent, the partner is named too with probability `noise * cooccurrence_strength(object)`; the names are then
/// listed in `order` (canonical: sorted by vocabulary index). Returns the caption and the hallucinated phrases.
/// Deterministic per seed; the draws do not depend on the order.
pub fn noisy_caption(scene: &Scene, seed: u64, noise: f64, order: CaptionOrder) -> (String, Vec<String>) {
    let mut rng = SplitMix64::new(seed ^ 0x4e4f_4953_5943_0004);
    let vocab = vocabulary();
    let present: Vec<usize> = scene.objects.iter().map(|o| object_index(o.color, o.shape)).collect();
    let (mut names, mut added) = (Vec::new(), Vec::new());
    for o in reading_order(scene) {
        names.push(o.phrase.clone());
        let obj = object_index(o.color, o.shape);
        let p = partner(obj);
        let draw = rng.next_f64();
        if !present.contains(&p) && !added.contains(&vocab[p]) && draw < noise * cooccurrence_strength(obj) {
            names.push(vocab[p].clone());
            added.push(vocab[p].clone());
        }
    }
    if order == CaptionOrder::Canonical {
        names.sort_by_key(|n| vocab.iter().position(|v| v == n));
    }
    (caption_of(&names), added)
}

/// "a red circle", "an orange square".
pub fn with_article(phrase: &str) -> String {
    let article = if phrase.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
    format!("{article} {phrase}")
}

fn caption_of(phrases: &[String]) -> String {
    let names: Vec<String> = phrases.iter().map(|p| with_article(p)).collect();
    match names.len() {
        0 => "The image is empty.".into(),
        1 => format!("There is {}.", names[0]),
        _ => format!("There is {} and {}.", names[..names.len() - 1].join(", "), names[names.len() - 1]),
    }
}

/// Where `a` is relative to `b` in the image, as an answer would say it ("above", "to the left of").
fn relation(a: &Object, b: &Object) -> &'static str {
    let (dx, dy) = (a.x - b.x, a.y - b.y);
    if dx.abs() >= dy.abs() {
        if dx < 0.0 {
            "to the left of"
        } else {
            "to the right of"
        }
    } else if dy < 0.0 {
        "above"
    } else {
        "below"
    }
}

/// "a", "a and b", "a, b, and c" (or without the serial comma).
fn english_list(items: &[String], serial_comma: bool) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [a, b] => format!("{a} and {b}"),
        [init @ .., last] => format!("{}{} and {last}", init.join(", "), if serial_comma { "," } else { "" }),
    }
}

/// A free-form ShapesWorld answer and its exact claims, for the divide step (`rlaifd claims`, `shapes sft --mix
/// divide`): the answer names the scene's objects the ways real answers do (a list after "The image shows" or
/// "There are", a pronoun that refers back, a spatial relation, an object named with "also"), and adds a hedge
/// about an absent object and an opinion, neither of which is a claim. The exact claims are one "There is <an
/// object>." per object the answer asserts, in order, then one "<The object> is <relation> the <object>." per
/// relation it states. Deterministic per seed.
pub fn divide_example(scene: &Scene, seed: u64) -> (String, Vec<String>) {
    let mut rng = SplitMix64::new(seed ^ 0x4449_5649_4445_0007);
    let mut pick = |n: usize| (rng.next_u64() % n.max(1) as u64) as usize;
    let objects = reading_order(scene);
    let vocab = vocabulary();
    let mut sentences: Vec<String> = Vec::new();
    let (mut exists, mut relations): (Vec<String>, Vec<String>) = (Vec::new(), Vec::new());
    if objects.is_empty() {
        return ("The image is empty.".into(), Vec::new());
    }
    // A list of the first k objects.
    let k = 1 + pick(objects.len());
    let listed: Vec<String> = objects[..k].iter().map(|o| with_article(&o.phrase)).collect();
    let list = english_list(&listed, pick(2) == 0);
    let be = if k > 1 { "are" } else { "is" };
    sentences.push(match pick(5) {
        0 => format!("The image shows {list}."),
        1 => format!("I see {list}."),
        // The captioner's own form says "There is" before any list.
        2 => format!("There {} {list}.", if pick(2) == 0 { be } else { "is" }),
        3 => format!("In this image, there {be} {list}."),
        _ => format!("This picture contains {list}."),
    });
    exists.extend(objects[..k].iter().map(|o| format!("There is {}.", with_article(&o.phrase))));
    // The rest, one sentence each, related to an object named before.
    for (i, o) in objects.iter().enumerate().skip(k) {
        let anchor = objects[pick(i)];
        let rel = relation(o, anchor);
        let a = with_article(&o.phrase);
        match pick(3) {
            0 => sentences.push(format!("There is also {a}. It is {rel} the {}.", anchor.phrase)),
            1 => sentences.push(format!("{} is {rel} the {}.", capitalize(&a), anchor.phrase)),
            _ => sentences.push(format!("The image also shows {a} {rel} the {}.", anchor.phrase)),
        }
        exists.push(format!("There is {a}."));
        relations.push(format!("The {} is {rel} the {}.", o.phrase, anchor.phrase));
    }
    // A pronoun after the opening list refers to its last object when the list has one object.
    if k == 1 && pick(2) == 0 {
        let o = objects[0];
        let color = COLORS[o.color].0;
        sentences.insert(1, format!("It is {color}."));
        relations.push(format!("The {} is {color}.", o.phrase));
    }
    // A hedge about an absent object and an opinion: not claims.
    let present: Vec<&str> = objects.iter().map(|o| o.phrase.as_str()).collect();
    let absent: Vec<&String> = vocab.iter().filter(|v| !present.contains(&v.as_str())).collect();
    if pick(2) == 0 && !absent.is_empty() {
        let z = with_article(absent[pick(absent.len())]);
        sentences.push(match pick(3) {
            0 => format!("There might be {z} as well."),
            1 => format!("I think there is {z} too."),
            _ => format!("Perhaps there is {z}."),
        });
    }
    if pick(2) == 0 {
        let o = objects[pick(objects.len())];
        sentences.push(match pick(3) {
            0 => format!("The {} looks very nice.", o.phrase),
            1 => "The colors are beautiful.".to_string(),
            _ => "Overall, it is a lovely picture.".to_string(),
        });
    }
    exists.extend(relations);
    (sentences.join(" "), exists)
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
}

/// Training examples for a ShapesWorld labeler: only the labeler's own question ("Is there a red circle in the
/// image? Please answer yes or no."), balanced between yes and no. Each present object is asked about twice, and
/// two absent objects per present one are drawn from the confusions a captioner makes: the other shapes of its
/// colour, its colour on another present object's shape (a binding error), its co-occurrence partner and its shape
/// in another colour. Deterministic per seed.
pub fn labeler_examples(scene: &Scene, seed: u64) -> Vec<(&'static str, String, String)> {
    let vocab = vocabulary();
    let mut rng = SplitMix64::new(seed ^ 0x4c41_4245_4c45_0006);
    let q = |obj: usize| {
        format!("Is there {} in the image?{}", with_article(&vocab[obj]), crate::feedback::verify::YES_NO_SUFFIX)
    };
    let present: Vec<usize> = scene.objects.iter().map(|o| object_index(o.color, o.shape)).collect();
    let mut out = Vec::new();
    let mut asked: Vec<usize> = Vec::new();
    for &o in &present {
        let (c, s) = (o / SHAPES.len(), o % SHAPES.len());
        let mut pool: Vec<usize> = (0..SHAPES.len()).map(|t| object_index(c, t)).collect();
        pool.extend(present.iter().map(|&p| object_index(c, p % SHAPES.len())));
        pool.push(partner(o));
        pool.push(object_index((c + 1 + (rng.next_u64() % (COLORS.len() as u64 - 1)) as usize) % COLORS.len(), s));
        pool.retain(|x| !present.contains(x) && !asked.contains(x));
        pool.dedup();
        for _ in 0..2 {
            if pool.is_empty() {
                break;
            }
            let n = pool.swap_remove((rng.next_u64() % pool.len() as u64) as usize);
            pool.retain(|&x| x != n);
            asked.push(n);
            out.push(("existence", q(n), "no".to_string()));
        }
        for _ in 0..2 {
            out.push(("existence", q(o), "yes".to_string()));
        }
    }
    out
}

/// The instructions of a scene: a caption, one existence question per present object plus one POPE negative
/// of each split, a count and (when unambiguous) an attribute question. Deterministic per seed.
pub fn instructions(scene: &Scene, seed: u64) -> Vec<Instruction> {
    let mut rng = SplitMix64::new(seed ^ 0x5155_4553_5400_0003);
    let vocab = vocabulary();
    let present: Vec<usize> = scene.objects.iter().map(|o| object_index(o.color, o.shape)).collect();
    let mut out = vec![Instruction {
        kind: "caption",
        prompt: CAPTION_PROMPTS[(rng.next_u64() % CAPTION_PROMPTS.len() as u64) as usize].into(),
        answer: caption(scene),
        split: None,
    }];
    let q = |obj: usize| format!("Is there {} in the image?", with_article(&vocab[obj]));
    for &o in &present {
        out.push(Instruction { kind: "existence", prompt: q(o), answer: "yes".into(), split: Some("present") });
    }
    let absent: Vec<usize> = (0..vocab.len()).filter(|o| !present.contains(o)).collect();
    if !absent.is_empty() {
        let random = absent[(rng.next_u64() % absent.len() as u64) as usize];
        out.push(Instruction { kind: "existence", prompt: q(random), answer: "no".into(), split: Some("random") });
        if let Some(&popular) = popular_order().iter().find(|o| !present.contains(o)) {
            out.push(Instruction {
                kind: "existence",
                prompt: q(popular),
                answer: "no".into(),
                split: Some("popular"),
            });
        }
        // Adversarial: an absent partner of a present object (what co-occurs with what is there).
        if let Some(adv) = present.iter().map(|&o| partner(o)).find(|p| !present.contains(p)) {
            out.push(Instruction {
                kind: "existence",
                prompt: q(adv),
                answer: "no".into(),
                split: Some("adversarial"),
            });
        }
    }
    let n = scene.objects.len();
    let words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"];
    out.push(Instruction {
        kind: "count",
        prompt: "How many objects are there?".into(),
        answer: words.get(n).copied().unwrap_or("many").into(),
        split: None,
    });
    if let Some(o) = scene.objects.iter().find(|o| scene.objects.iter().filter(|p| p.shape == o.shape).count() == 1) {
        out.push(Instruction {
            kind: "attribute",
            prompt: format!("What color is the {}?", SHAPES[o.shape]),
            answer: COLORS[o.color].0.into(),
            split: None,
        });
    }
    out
}

/// Every word ShapesWorld prompts, answers and the chat template use (lower case; punctuation separate).
pub fn words() -> Vec<String> {
    let mut w: Vec<String> = Vec::new();
    let mut add = |s: &str| {
        for t in s.split_whitespace() {
            if !w.iter().any(|x| x == t) {
                w.push(t.to_string());
            }
        }
    };
    add("user : assistant : . , ? !");
    for p in CAPTION_PROMPTS {
        add(&p.to_lowercase().replace(['.', '?'], " "));
    }
    add("is there a an in the image what color how many objects are yes no it there's i see and with");
    add("zero one two three four five six seven eight nine many empty");
    for (c, _) in COLORS {
        add(c);
    }
    for s in SHAPES {
        add(s);
        add(&format!("{s}s"));
    }
    add("crosses");
    // The labeler's yes/no suffix (feedback::verify::YES_NO_SUFFIX), so a ShapesWorld model can label itself.
    add("please answer yes or no");
    w
}

/// A word-level `tokenizer.json` for ShapesWorld (loadable by Hugging Face tokenizers): `<unk>`=0, `<s>`=1,
/// `</s>`=2, `<pad>`=3, then the words of `words()`, then `<image>` last; lower-casing normalizer, whitespace
/// and punctuation pre-tokenizer, BOS added by the post-processor.
pub fn build_tokenizer() -> Result<tokenizers::Tokenizer, String> {
    word_level_tokenizer(&words(), false)
}

/// The prompt the ShapesWorld divide model (`assets/shapes-divide`) lists an answer's claims after; the model
/// directory carries it as `divide_prompt.txt` (`feedback::claims::ExtractorPrompts`).
pub const DIVIDE_PROMPT: &str = "claims : {answer}";
/// The prompt it writes a claim's yes/no question after (`question_prompt.txt`).
pub const DIVIDE_QUESTION_PROMPT: &str = "question : {claim}";

/// Every word of the divide model: ShapesWorld's, those of `divide_example`'s answers, and of its prompts and
/// listings.
pub fn divide_words() -> Vec<String> {
    let mut w = words();
    let extra = "- none claims question also might be as well think too perhaps above below to left right of \
                 shows see this picture contains looks very nice colors beautiful overall lovely";
    for t in extra.split_whitespace() {
        if !w.iter().any(|x| x == t) {
            w.push(t.to_string());
        }
    }
    w
}

/// The divide model's tokenizer: `build_tokenizer`'s layout over `divide_words()`, with a line break as a token of
/// its own (after the words, before `<image>`), so a listing keeps one claim per line.
pub fn build_divide_tokenizer() -> Result<tokenizers::Tokenizer, String> {
    word_level_tokenizer(&divide_words(), true)
}

fn word_level_tokenizer(words: &[String], newline: bool) -> Result<tokenizers::Tokenizer, String> {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::normalizers::utils::Lowercase;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::{AddedToken, Tokenizer};
    let mut vocab: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
    for (i, t) in ["<unk>", "<s>", "</s>", "<pad>"].iter().enumerate() {
        vocab.insert(t.to_string(), i as u32);
    }
    for w in words {
        let id = vocab.len() as u32;
        vocab.entry(w.clone()).or_insert(id);
    }
    if newline {
        let id = vocab.len() as u32;
        vocab.insert("\n".into(), id);
    }
    let image_id = vocab.len() as u32;
    vocab.insert("<image>".into(), image_id);
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("<unk>".into())
        .build()
        .map_err(|e| e.to_string())?;
    let mut tok = Tokenizer::new(model);
    tok.with_normalizer(Some(Lowercase));
    tok.with_pre_tokenizer(Some(Whitespace {}));
    let post = TemplateProcessing::builder()
        .try_single("<s> $A")
        .map_err(|e| e.to_string())?
        .special_tokens(vec![("<s>", 1)])
        .build()
        .map_err(|e| e.to_string())?;
    tok.with_post_processor(Some(post));
    if newline {
        tok.add_tokens(&[AddedToken::from("\n", false)]);
    }
    tok.add_special_tokens(&[
        AddedToken::from("<unk>", true),
        AddedToken::from("<s>", true),
        AddedToken::from("</s>", true),
        AddedToken::from("<pad>", true),
        AddedToken::from("<image>", true),
    ]);
    Ok(tok)
}

/// The yes/no question the divide model learns for an exact claim: "There is a red circle." -> "Is there a red
/// circle in the image?" (the labeler's own form), other claims by `feedback::text::claim_to_question`.
pub fn divide_question(claim: &str) -> String {
    match claim.strip_prefix("There is ") {
        Some(rest) => format!("Is there {} in the image?", rest.trim_end_matches('.')),
        None => crate::feedback::text::claim_to_question(claim),
    }
}

/// A captioner's answer and its exact claims: the scene's caption with co-occurrence noise (`noisy_caption`, as
/// the loop's policy writes them), and a third of the time cut off after a word, as an answer that ran out of
/// tokens ("There is a red circle, a blue"): only the objects named in full are claims.
pub fn divide_caption_example(scene: &Scene, seed: u64) -> (String, Vec<String>) {
    let mut rng = SplitMix64::new(seed ^ 0x4341_5054_494f_0008);
    let (caption, _) = noisy_caption(scene, seed, 0.5, CaptionOrder::Canonical);
    let names: Vec<String> = mentions_in_order(&caption);
    let exact = |n: &[String]| n.iter().map(|o| format!("There is {}.", with_article(o))).collect::<Vec<_>>();
    if names.is_empty() || rng.next_f64() >= 1.0 / 3.0 {
        return (caption, exact(&names));
    }
    // Keep m whole objects and one or two words of the next.
    let m = (rng.next_u64() % names.len() as u64) as usize;
    let items: Vec<String> = names[..m].iter().map(|o| with_article(o)).collect();
    let next = with_article(&names[m]);
    let partial: Vec<&str> = next.split_whitespace().take(1 + (rng.next_u64() % 2) as usize).collect();
    let mut text = format!("There is {}", items.join(", "));
    text.push_str(if m == 0 { "" } else { ", " });
    text.push_str(&partial.join(" "));
    (text, exact(&names[..m]))
}

/// The object phrases of a caption in the order it names them.
fn mentions_in_order(caption: &str) -> Vec<String> {
    let vocab = vocabulary();
    let lower = caption.to_lowercase();
    let mut found: Vec<(usize, String)> =
        vocab.iter().filter_map(|v| lower.find(v.as_str()).map(|at| (at, v.clone()))).collect();
    found.sort();
    found.into_iter().map(|(_, v)| v).collect()
}

/// Supervised examples of one scene for the divide model: the listings of a `divide_example` answer's and of a
/// `divide_caption_example` caption's exact claims ("- There is a red circle.", one a line; "None" for an answer
/// without claims) after `DIVIDE_PROMPT`, and each claim's question (`divide_question`) after
/// `DIVIDE_QUESTION_PROMPT`. Text only. Deterministic per seed.
pub fn divide_sft_examples(scene: &Scene, seed: u64) -> Vec<(&'static str, String, String)> {
    let mut out = Vec::new();
    let mut asked: Vec<String> = Vec::new();
    for (answer, exact) in [divide_example(scene, seed), divide_caption_example(scene, seed)] {
        let listing = if exact.is_empty() {
            "None".to_string()
        } else {
            exact.iter().map(|c| format!("- {c}")).collect::<Vec<_>>().join("\n")
        };
        out.push(("divide", DIVIDE_PROMPT.replace("{answer}", &answer), listing));
        for c in exact {
            if !asked.contains(&c) {
                out.push(("question", DIVIDE_QUESTION_PROMPT.replace("{claim}", &c), divide_question(&c)));
                asked.push(c);
            }
        }
    }
    out
}

/// Supervised examples of one scene for training a base model: one caption (random phrasing) carrying caption
/// noise (see `noisy_caption`), and clean answers to every existence question of `instructions`, plus one "no"
/// per absent partner of a present object and two hard negatives (an absent object sharing a present object's
/// colour, one sharing a present object's shape: they teach the model to bind colour to shape), the count and the
/// attribute question. Half the existence questions carry the labeler's suffix (`feedback::verify::YES_NO_SUFFIX`), so the model
/// answers the labeler's questions as it answers plain ones. Each is (kind, prompt, answer); captions
/// hallucinate, yes/no answers never do.
pub fn sft_examples(
    scene: &Scene,
    seed: u64,
    caption_noise: f64,
    order: CaptionOrder,
) -> Vec<(&'static str, String, String)> {
    let vocab = vocabulary();
    let mut rng = SplitMix64::new(seed ^ 0x4841_5244_4e45_0005);
    let mut out = Vec::new();
    let present: Vec<usize> = scene.objects.iter().map(|o| object_index(o.color, o.shape)).collect();
    let mut asked: Vec<String> = Vec::new();
    let q = |obj: usize| format!("Is there {} in the image?", with_article(&vocab[obj]));
    for ins in instructions(scene, seed) {
        if ins.kind == "caption" {
            out.push(("caption", ins.prompt, noisy_caption(scene, seed, caption_noise, order).0));
        } else {
            asked.push(ins.prompt.clone());
            out.push((ins.kind, ins.prompt, ins.answer));
        }
    }
    let mut negatives: Vec<usize> = present.iter().map(|&o| partner(o)).collect();
    if let Some(&o) = present.get((rng.next_u64() % present.len().max(1) as u64) as usize) {
        let (c, s) = (o / SHAPES.len(), o % SHAPES.len());
        let same_color: Vec<usize> =
            (0..SHAPES.len()).map(|t| object_index(c, t)).filter(|x| !present.contains(x)).collect();
        let same_shape: Vec<usize> =
            (0..COLORS.len()).map(|k| object_index(k, s)).filter(|x| !present.contains(x)).collect();
        for group in [same_color, same_shape] {
            if !group.is_empty() {
                negatives.push(group[(rng.next_u64() % group.len() as u64) as usize]);
            }
        }
    }
    for n in negatives {
        if !present.contains(&n) && !asked.contains(&q(n)) {
            asked.push(q(n));
            out.push(("existence", q(n), "no".into()));
        }
    }
    for ex in out.iter_mut().filter(|e| e.0 == "existence") {
        if rng.next_u64().is_multiple_of(2) {
            ex.1.push_str(crate::feedback::verify::YES_NO_SUFFIX);
        }
    }
    out
}
