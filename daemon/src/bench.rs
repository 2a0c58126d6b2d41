//! `rlaifd eval bench`: hallucination benchmarks in their published formats, on data the user supplies (nothing is
//! downloaded). Object HalBench (CHAIR over COCO `instances_*.json`, with CHAIR's synonym lists) and POPE (its
//! question files). Metrics keep their usual names (`chair_s`, `chair_i`, `cover`, `accuracy`, `precision`,
//! `recall`, `f1`, `yes_ratio`).

use anyhow::{bail, Context, Result};
use engine::hallucination::{binary_metrics, BinaryMetrics};
use std::collections::{BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};

/// CHAIR's COCO synonym lists (`assets/bench/coco_synonyms.txt`, its source named there).
pub const COCO_SYNONYMS: &str = include_str!("../../assets/bench/coco_synonyms.txt");

/// Object HalBench's eight description prompts (RLHF-V, Table 6 of its paper); image k of the benchmark gets prompt
/// k mod 8.
pub const OBJHAL_PROMPTS: [&str; 8] = [
    "Provide a thorough description of the given image.",
    "What is this photo about? Please answer in great detail.",
    "Provide a thorough description of the given picture.",
    "Explain the narrative or story that the image seems to convey, detailing each part that contributes to it.",
    "Please provide a detailed description of the image. Describe the visual elements, colors, shapes, textures, and any objects or people present along with the overall mood or atmosphere portrayed in the image.",
    "Please provide a detailed description of the image, including its visual elements, such as colors, shapes, textures, objects, and people.",
    "Provide an intricate description of the image, capturing its visual elements, including colors, shapes, textures, objects, and any people present.",
    "Compose a detailed account of the image, encompassing its visual characteristics, like colors, shapes, textures, objects, and any human subjects, by paying careful attention to the specifics.",
];

/// Largest data file read (COCO's `instances_train2014.json` is about 330 MB).
pub const MAX_DATA_BYTES: u64 = 1 << 30;

/// Object categories and the words that name them, for finding the objects a text mentions.
pub struct Synonyms {
    /// Every name (lowercase words) and its category, longest names first.
    names: Vec<(Vec<String>, String)>,
    categories: BTreeSet<String>,
}

fn words(text: &str) -> Vec<String> {
    text.to_lowercase().split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_string).collect()
}

/// The singular readings of an English word ("dogs" -> "dog", "boxes" -> "box", "ponies" -> "pony"), the word
/// first.
fn readings(w: &str) -> Vec<String> {
    let mut out = vec![w.to_string()];
    if let Some(s) = w.strip_suffix("ies") {
        out.push(format!("{s}y"));
    }
    if let Some(s) = w.strip_suffix("es") {
        out.push(s.to_string());
    }
    if let Some(s) = w.strip_suffix('s').filter(|s| !s.ends_with('s')) {
        out.push(s.to_string());
    }
    match w {
        "men" => out.push("man".into()),
        "women" => out.push("woman".into()),
        "people" | "persons" => out.push("person".into()),
        "knives" => out.push("knife".into()),
        "mice" => out.push("mouse".into()),
        _ => {}
    }
    out
}

impl Synonyms {
    /// Parses one category a line, comma-separated names, the category's own name first; blank lines and lines
    /// starting with `#` are skipped. A name listed under two categories is an error naming both.
    pub fn parse(text: &str, source: &str) -> Result<Self> {
        let mut owner: HashMap<Vec<String>, String> = HashMap::new();
        let mut names = Vec::new();
        let mut categories = BTreeSet::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let parts: Vec<&str> = line.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
            let Some(category) = parts.first().map(|c| c.to_lowercase()) else { continue };
            categories.insert(category.clone());
            for name in parts {
                let w = words(name);
                if w.is_empty() {
                    continue;
                }
                match owner.get(&w) {
                    Some(c) if *c != category => {
                        bail!("{source} line {}: `{name}` names both {c} and {category}", n + 1)
                    }
                    Some(_) => continue,
                    None => {}
                }
                owner.insert(w.clone(), category.clone());
                names.push((w, category.clone()));
            }
        }
        if categories.is_empty() {
            bail!("{source} lists no categories (one a line: the category's name, then its synonyms, comma-separated)");
        }
        names.sort_by_key(|(w, _)| std::cmp::Reverse(w.len()));
        Ok(Synonyms { names, categories })
    }

    pub fn coco() -> Self {
        Synonyms::parse(COCO_SYNONYMS, "assets/bench/coco_synonyms.txt").expect("the bundled synonyms parse")
    }

    pub fn has_category(&self, c: &str) -> bool {
        self.categories.contains(c)
    }

    /// The categories `text` mentions: at each word, the longest name that matches there (a plural last word read
    /// as its singular), then on after it.
    pub fn mentions(&self, text: &str) -> BTreeSet<String> {
        self.mention_list(text).into_iter().collect()
    }

    /// `mentions` with every occurrence, in order.
    pub fn mention_list(&self, text: &str) -> Vec<String> {
        let w = words(text);
        let mut out = Vec::new();
        let mut i = 0;
        while i < w.len() {
            let hit = self.names.iter().find(|(name, _)| {
                let k = name.len();
                i + k <= w.len()
                    && name[..k - 1] == w[i..i + k - 1]
                    && readings(&w[i + k - 1]).iter().any(|r| *r == name[k - 1])
            });
            match hit {
                Some((name, c)) => {
                    out.push(c.clone());
                    i += name.len();
                }
                None => i += 1,
            }
        }
        out
    }
}

/// CHAIR over (answer, ground-truth categories) pairs, objects found with `syn` (`caption_metrics`' counts:
/// CHAIR_s, CHAIR_i with distinct objects per answer, Cover, mean length in words).
pub fn chair(syn: &Synonyms, items: &[(String, BTreeSet<String>)]) -> engine::hallucination::CaptionMetrics {
    let truths: Vec<Vec<String>> = items.iter().map(|(_, gt)| gt.iter().cloned().collect()).collect();
    engine::hallucination::caption_metrics_by(
        items.iter().zip(&truths).map(|((answer, _), gt)| (answer.as_str(), gt.as_slice())),
        |text| syn.mentions(text),
    )
}

/// POPE's reading of an answer (its evaluation script): the first sentence, commas dropped, is "no" when one of
/// its words is "no", "not" or "No", else "yes".
pub fn pope_answer(text: &str) -> bool {
    let first = text.split('.').next().unwrap_or("").replace(',', "");
    !first.split_whitespace().any(|w| w == "no" || w == "not" || w == "No")
}

/// POPE metrics (positive = "yes") over (model says yes, label is yes).
pub fn pope_metrics(items: &[(bool, bool)]) -> BinaryMetrics {
    let v: Vec<(Option<bool>, bool)> = items.iter().map(|&(p, l)| (Some(p), l)).collect();
    binary_metrics(&v, true)
}

/// Reads a data file after checking its size.
pub fn read_data(path: &Path, max: u64) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a file", path.display());
    }
    if meta.len() > max {
        bail!("{} is {} bytes; the most this reads is {max}", path.display(), meta.len());
    }
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// `dir/name` for an image name from a data file: a relative path that stays inside `dir`.
pub fn image_path(dir: &Path, name: &str, what: &str) -> Result<PathBuf> {
    let rel = Path::new(name);
    if name.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        bail!("{what}: image `{name}` must be a relative path inside --images (no `..`, no absolute path)");
    }
    Ok(dir.join(rel))
}

/// One benchmark image of a COCO instances file and its ground-truth categories.
pub struct CocoImage {
    pub id: u64,
    pub file_name: String,
    pub objects: BTreeSet<String>,
}

/// The images of a COCO `instances_*.json` (in file order) with their annotated categories, plus the objects that
/// the image's reference captions mention when a `captions_*.json` is given (CHAIR's ground truth). Categories
/// must be names of `syn` (its first name on a line).
pub fn coco_images(instances: &[u8], captions: Option<&[u8]>, syn: &Synonyms, source: &str) -> Result<Vec<CocoImage>> {
    #[derive(serde::Deserialize)]
    struct Img {
        id: u64,
        file_name: String,
    }
    #[derive(serde::Deserialize)]
    struct Ann {
        image_id: u64,
        #[serde(default)]
        category_id: Option<u64>,
        #[serde(default)]
        caption: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Cat {
        id: u64,
        name: String,
    }
    #[derive(serde::Deserialize)]
    struct Instances {
        images: Vec<Img>,
        annotations: Vec<Ann>,
        #[serde(default)]
        categories: Vec<Cat>,
    }
    let inst: Instances = serde_json::from_slice(instances)
        .with_context(|| format!("{source}: not a COCO instances file (images, annotations, categories)"))?;
    let mut cats = HashMap::new();
    for c in inst.categories {
        let name = c.name.to_lowercase();
        if !syn.has_category(&name) {
            bail!("{source}: category `{}` (id {}) is not in the synonyms (give --synonyms FILE with a line starting with it)", c.name, c.id);
        }
        cats.insert(c.id, name);
    }
    let mut objects: HashMap<u64, BTreeSet<String>> = HashMap::new();
    for a in inst.annotations {
        if let Some(cid) = a.category_id {
            let c = cats.get(&cid).with_context(|| {
                format!("{source}: an annotation names category id {cid}, which is not in `categories`")
            })?;
            objects.entry(a.image_id).or_default().insert(c.clone());
        }
    }
    if let Some(bytes) = captions {
        #[derive(serde::Deserialize)]
        struct Caps {
            annotations: Vec<Ann>,
        }
        let caps: Caps = serde_json::from_slice(bytes)
            .context("--captions: not a COCO captions file (annotations with image_id and caption)")?;
        for a in caps.annotations {
            if let Some(text) = a.caption {
                objects.entry(a.image_id).or_default().extend(syn.mentions(&text));
            }
        }
    }
    Ok(inst
        .images
        .into_iter()
        .map(|i| CocoImage { objects: objects.remove(&i.id).unwrap_or_default(), id: i.id, file_name: i.file_name })
        .collect())
}

/// One POPE question (a line of its `.json` files, which are JSON lines).
#[derive(serde::Deserialize)]
pub struct PopeQuestion {
    #[serde(default)]
    pub question_id: Option<serde_json::Value>,
    pub image: String,
    pub text: String,
    pub label: String,
}

pub fn pope_questions(bytes: &[u8], source: &str) -> Result<Vec<PopeQuestion>> {
    let text = std::str::from_utf8(bytes).with_context(|| format!("{source} is not UTF-8"))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let q: PopeQuestion = serde_json::from_str(line)
            .with_context(|| format!("{source} line {}: expected {{\"image\", \"text\", \"label\"}}", n + 1))?;
        if q.label != "yes" && q.label != "no" {
            bail!("{source} line {}: label `{}` must be \"yes\" or \"no\"", n + 1, q.label);
        }
        out.push(q);
    }
    if out.is_empty() {
        bail!("{source} holds no questions");
    }
    Ok(out)
}

/// Which benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Suite {
    Objhal,
    Pope,
    Amber,
    Mmhal,
}

impl Suite {
    pub fn name(self) -> &'static str {
        match self {
            Suite::Objhal => "objhal",
            Suite::Pope => "pope",
            Suite::Amber => "amber",
            Suite::Mmhal => "mmhal",
        }
    }
}

/// Where a benchmark's data is and how to ask it.
#[derive(Clone, Debug, Default)]
pub struct BenchSource {
    pub data: PathBuf,
    pub images: PathBuf,
    pub synonyms: Option<PathBuf>,
    pub captions: Option<PathBuf>,
    /// Replaces objhal's prompts; appended to each POPE question.
    pub prompt: Option<String>,
    pub limit: Option<usize>,
    /// AMBER: its annotations.json, relation.json (word associations) and safe_words.txt.
    pub annotations: Option<PathBuf>,
    pub relation: Option<PathBuf>,
    pub safe_words: Option<PathBuf>,
}

/// One question of a loaded benchmark: the image, the prompt, and what the answer is scored against.
pub struct BenchItem {
    pub image: PathBuf,
    /// The image's name in the data file.
    pub name: String,
    pub prompt: String,
    pub truth: Truth,
}

pub enum Truth {
    /// objhal: the image's ground-truth categories.
    Objects(BTreeSet<String>),
    /// pope: the label ("yes" = true).
    Label(bool),
    /// AMBER's generative task: the objects in the image and the hallucination-prone ones that are not.
    Generative { truth: Vec<String>, hallu: Vec<String> },
    /// AMBER's discriminative task: its type (`discriminative-hallucination`, `-attribute-state`, ...) and label.
    Discriminative { kind: String, yes: bool },
    /// MMHal-Bench: what the judge is told (the question's type, the image's contents, the standard answer).
    Judged { question_type: String, image_content: Vec<String>, gt_answer: String },
}

/// A benchmark read and checked (every image path resolved inside its folder), ready to run.
pub struct Bench {
    pub suite: Suite,
    pub items: Vec<BenchItem>,
    syn: Option<Synonyms>,
    amber: Option<AmberWords>,
}

/// AMBER's word lists: every word an answer's objects are looked for among, each word's associated words (a
/// truth object's associates count as naming it), and the words never counted as hallucinations.
struct AmberWords {
    association: HashMap<String, Vec<String>>,
    safe: std::collections::HashSet<String>,
}

impl Bench {
    pub fn load(suite: Suite, src: &BenchSource) -> Result<Bench> {
        if !src.images.is_dir() {
            bail!("{}: the images folder is not a folder", src.images.display());
        }
        let data = read_data(&src.data, MAX_DATA_BYTES)?;
        let name = src.data.display().to_string();
        if suite != Suite::Objhal && (src.synonyms.is_some() || src.captions.is_some()) {
            bail!("synonyms and captions are objhal's (CHAIR's ground truth)");
        }
        if suite != Suite::Amber && (src.annotations.is_some() || src.relation.is_some() || src.safe_words.is_some()) {
            bail!("annotations, relation and safe words are AMBER's");
        }
        let mut amber = None;
        let limit = src.limit.unwrap_or(usize::MAX);
        let (items, syn) = match suite {
            Suite::Objhal => {
                let syn = match &src.synonyms {
                    Some(p) => {
                        let bytes = read_data(p, 16 << 20)?;
                        let text = String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8", p.display()))?;
                        Synonyms::parse(&text, &p.display().to_string())?
                    }
                    None => Synonyms::coco(),
                };
                let caps = match &src.captions {
                    Some(p) => Some(read_data(p, MAX_DATA_BYTES)?),
                    None => None,
                };
                let imgs = coco_images(&data, caps.as_deref(), &syn, &name)?;
                let items = imgs
                    .into_iter()
                    .take(limit)
                    .enumerate()
                    .map(|(k, img)| {
                        Ok(BenchItem {
                            image: image_path(&src.images, &img.file_name, &name)?,
                            prompt: src
                                .prompt
                                .clone()
                                .unwrap_or_else(|| OBJHAL_PROMPTS[k % OBJHAL_PROMPTS.len()].into()),
                            name: img.file_name,
                            truth: Truth::Objects(img.objects),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                (items, Some(syn))
            }
            Suite::Pope => {
                let items = pope_questions(&data, &name)?
                    .into_iter()
                    .take(limit)
                    .map(|q| {
                        Ok(BenchItem {
                            image: image_path(&src.images, &q.image, &name)?,
                            prompt: match &src.prompt {
                                Some(extra) => format!("{} {extra}", q.text),
                                None => q.text,
                            },
                            name: q.image,
                            truth: Truth::Label(q.label == "yes"),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                (items, None)
            }
            Suite::Amber => {
                let (items, syn, words) = amber_items(src, &data, &name, limit)?;
                amber = Some(words);
                (items, Some(syn))
            }
            Suite::Mmhal => (mmhal_items(src, &data, &name, limit)?, None),
        };
        if items.is_empty() {
            bail!("{name} holds nothing to evaluate");
        }
        Ok(Bench { suite, items, syn, amber })
    }

    /// Greedy answers to every item with `max_new_tokens`, then the suite's metrics as one JSON object.
    /// `each(k, item, answer)` runs after item k (to log it, show progress, or let urgent work in).
    pub fn run(
        &self,
        m: &engine::Model,
        adapter: Option<&engine::Adapter>,
        tok: &engine::tokenizer::TextTokenizer,
        max_new_tokens: usize,
        mut each: impl FnMut(usize, &BenchItem, &str) -> Result<()>,
    ) -> Result<serde_json::Value> {
        if self.suite == Suite::Mmhal {
            bail!("MMHal-Bench answers are rated by a judge model: use run_judged");
        }
        let answers = self.answer(m, adapter, tok, max_new_tokens, &mut each)?;
        self.score(&answers)
    }

    /// MMHal-Bench: every answer, then the judge's rating of each (`judge_rating`); `each` also gets the judge's
    /// output (after the answer, as `answer\n---\njudge`).
    pub fn run_judged(
        &self,
        m: &engine::Model,
        adapter: Option<&engine::Adapter>,
        tok: &engine::tokenizer::TextTokenizer,
        max_new_tokens: usize,
        judge: (&engine::Model, &engine::tokenizer::TextTokenizer),
        mut each: impl FnMut(usize, &BenchItem, &str, &str, Option<u8>) -> Result<()>,
    ) -> Result<serde_json::Value> {
        let answers = self.answer(m, adapter, tok, max_new_tokens, &mut |_, _, _| Ok(()))?;
        let mut ratings: Vec<(String, Option<u8>)> = Vec::new();
        for (k, (item, answer)) in self.items.iter().zip(&answers).enumerate() {
            let Truth::Judged { question_type, image_content, gt_answer } = &item.truth else {
                bail!("item {k} is not an MMHal-Bench question")
            };
            let prompt = mmhal_judge_prompt(&item.prompt, image_content, gt_answer, answer);
            let ids = judge.1.encode_chat(engine::tokenizer::TEXT_TEMPLATE, &prompt)?;
            let params =
                engine::sampling::SamplingParams { temperature: 0.0, max_new_tokens: 64, ..Default::default() };
            let req =
                engine::generate::GenerateRequest { ids: &ids, pixels: None, seeds: &[0], params, stop_ids: vec![] };
            let out = engine::generate::generate(judge.0, &req, None)?;
            let verdict = judge.1.decode(&out[0].tokens)?;
            let rating = judge_rating(&verdict);
            each(k, item, answer, &verdict, rating)?;
            ratings.push((question_type.clone(), rating));
        }
        Ok(mmhal_metrics(&ratings))
    }

    fn answer(
        &self,
        m: &engine::Model,
        adapter: Option<&engine::Adapter>,
        tok: &engine::tokenizer::TextTokenizer,
        max_new_tokens: usize,
        each: &mut dyn FnMut(usize, &BenchItem, &str) -> Result<()>,
    ) -> Result<Vec<String>> {
        let mut cache: HashMap<&Path, std::sync::Arc<engine::image::PixelValues>> = HashMap::new();
        let mut answers = Vec::with_capacity(self.items.len());
        for (k, item) in self.items.iter().enumerate() {
            let px = match cache.get(item.image.as_path()) {
                Some(px) => px.clone(),
                None => {
                    let px = std::sync::Arc::new(
                        m.load_image(&item.image)
                            .with_context(|| format!("image {} ({})", item.name, item.image.display()))?,
                    );
                    // POPE asks several questions about each image; an objhal image is asked once.
                    if self.suite == Suite::Pope {
                        cache.insert(item.image.as_path(), px.clone());
                    }
                    px
                }
            };
            let ids = tok.encode_chat(engine::tokenizer::LLAVA_15_TEMPLATE, &item.prompt)?;
            let params = engine::sampling::SamplingParams { temperature: 0.0, max_new_tokens, ..Default::default() };
            let req = engine::generate::GenerateRequest {
                ids: &ids,
                pixels: Some(&px),
                seeds: &[0],
                params,
                stop_ids: vec![],
            };
            let out = engine::generate::generate(m, &req, adapter)?;
            let answer = tok.decode(&out[0].tokens)?;
            each(k, item, &answer)?;
            answers.push(answer);
        }
        Ok(answers)
    }

    fn score(&self, answers: &[String]) -> Result<serde_json::Value> {
        Ok(match self.suite {
            Suite::Objhal => {
                let syn = self.syn.as_ref().context("objhal without synonyms")?;
                let items: Vec<(String, BTreeSet<String>)> = answers
                    .iter()
                    .zip(&self.items)
                    .map(|(a, it)| match &it.truth {
                        Truth::Objects(o) => (a.clone(), o.clone()),
                        _ => (a.clone(), BTreeSet::new()),
                    })
                    .collect();
                let c = chair(syn, &items);
                serde_json::json!({ "suite": "objhal", "images": c.answers, "chair_s": c.chair_s, "chair_i": c.chair_i, "cover": c.cover, "mean_length": c.mean_length })
            }
            Suite::Pope => {
                let items: Vec<(bool, bool)> = answers
                    .iter()
                    .zip(&self.items)
                    .map(|(a, it)| (pope_answer(a), matches!(it.truth, Truth::Label(true))))
                    .collect();
                let p = pope_metrics(&items);
                serde_json::json!({ "suite": "pope", "questions": p.n, "accuracy": p.accuracy, "precision": p.precision, "recall": p.recall, "f1": p.f1, "yes_ratio": p.yes_ratio })
            }
            Suite::Amber => {
                let syn = self.syn.as_ref().context("AMBER without its vocabulary")?;
                let words = self.amber.as_ref().context("AMBER without its word lists")?;
                amber_metrics(syn, words, &self.items, answers)
            }
            Suite::Mmhal => bail!("MMHal-Bench answers are rated by a judge model"),
        })
    }

    /// The categories an objhal answer names (for logs); empty for other suites.
    pub fn mentions(&self, answer: &str) -> BTreeSet<String> {
        self.syn.as_ref().map(|s| s.mentions(answer)).unwrap_or_default()
    }
}

/// AMBER's items: every query of the query file (`[{"id", "image", "query"}]`) with its annotation (the annotations
/// file's entry `id - 1`, as AMBER's script reads it), and the word lists (relation.json, safe_words.txt;
/// without them, no associations and no safe words).
fn amber_items(
    src: &BenchSource,
    data: &[u8],
    name: &str,
    limit: usize,
) -> Result<(Vec<BenchItem>, Synonyms, AmberWords)> {
    #[derive(serde::Deserialize)]
    struct Query {
        id: usize,
        image: String,
        query: String,
    }
    #[derive(serde::Deserialize)]
    struct Ann {
        #[serde(rename = "type")]
        kind: String,
        truth: serde_json::Value,
        #[serde(default)]
        hallu: Vec<String>,
    }
    let queries: Vec<Query> = serde_json::from_slice(data)
        .with_context(|| format!("{name}: not an AMBER query file ([{{\"id\", \"image\", \"query\"}}])"))?;
    let ann_path = src.annotations.as_ref().context("AMBER needs its annotations.json (--annotations FILE)")?;
    let anns: Vec<Ann> = serde_json::from_slice(&read_data(ann_path, MAX_DATA_BYTES)?).with_context(|| {
        format!("{}: not AMBER's annotations ([{{\"id\", \"type\", \"truth\", ...}}])", ann_path.display())
    })?;
    let association: HashMap<String, Vec<String>> = match &src.relation {
        Some(p) => serde_json::from_slice(&read_data(p, 64 << 20)?).with_context(|| {
            format!("{}: not AMBER's relation.json ({{\"word\": [\"associated\", ...]}})", p.display())
        })?,
        None => HashMap::new(),
    };
    let safe = match &src.safe_words {
        Some(p) => String::from_utf8(read_data(p, 16 << 20)?)
            .with_context(|| format!("{} is not UTF-8", p.display()))?
            .lines()
            .map(|l| l.trim().to_lowercase())
            .filter(|l| !l.is_empty())
            .collect(),
        None => Default::default(),
    };
    let mut vocab: BTreeSet<String> =
        association.iter().flat_map(|(k, v)| std::iter::once(k).chain(v)).cloned().collect();
    let mut items = Vec::new();
    for q in queries.into_iter().take(limit) {
        let ann = q.id.checked_sub(1).and_then(|i| anns.get(i)).with_context(|| {
            format!("{name}: query id {} has no annotation (AMBER's annotations are listed by id, from 1)", q.id)
        })?;
        let truth = if ann.kind == "generative" {
            let list = |v: &serde_json::Value| -> Result<Vec<String>> {
                serde_json::from_value(v.clone())
                    .with_context(|| format!("{name}: annotation {}: truth must be a list of objects", q.id))
            };
            let (truth, hallu) = (list(&ann.truth)?, ann.hallu.clone());
            vocab.extend(truth.iter().chain(&hallu).cloned());
            Truth::Generative { truth, hallu }
        } else {
            let yes = match ann.truth.as_str() {
                Some("yes") => true,
                Some("no") => false,
                _ => bail!("{name}: annotation {} ({}): truth must be \"yes\" or \"no\"", q.id, ann.kind),
            };
            Truth::Discriminative { kind: ann.kind.clone(), yes }
        };
        items.push(BenchItem {
            image: image_path(&src.images, &q.image, name)?,
            prompt: q.query,
            name: q.image,
            truth,
        });
    }
    // Each vocabulary word is its own "category": mentions are found as objhal finds them (plurals, longest name).
    let lines: String = vocab.iter().map(|w| format!("{}\n", w.replace(',', " "))).collect();
    let syn = Synonyms::parse(&lines, "AMBER's vocabulary")?;
    Ok((items, syn, AmberWords { association, safe }))
}

/// AMBER's metrics as its script computes them (occurrences of vocabulary words in each generative answer; a word
/// that is a truth object or one of its associates covers that object, a safe word is never a hallucination,
/// anything else is one; a hallucination-prone object or associate named counts toward Cog), with two differences:
/// words are found by the lists alone (its script tags nouns with NLTK and also accepts spaCy similarity above
/// 0.8), and a discriminative answer is read by its first yes/no word (its script needs exactly "Yes" or "No").
/// Names: `chair_i` (AMBER's CHAIR), `cover`, `hal` (answers with a hallucination), `cog`; discriminative
/// `accuracy`, `precision`, `recall`, `f1` with "no" as the positive class, as AMBER reports them; `amber_score`
/// = (1 - CHAIR + F1) / 2.
fn amber_metrics(syn: &Synonyms, words: &AmberWords, items: &[BenchItem], answers: &[String]) -> serde_json::Value {
    let (mut named, mut unsafe_, mut cover, mut cover_n, mut cog, mut cog_n, mut hal, mut gen) =
        (0, 0, 0, 0, 0, 0, 0, 0);
    let mut disc: Vec<(Option<bool>, bool)> = Vec::new();
    let assoc = |w: &str| words.association.get(w).cloned().unwrap_or_default();
    for (item, answer) in items.iter().zip(answers) {
        match &item.truth {
            Truth::Generative { truth, hallu } => {
                gen += 1;
                let mut covered = vec![false; truth.len()];
                let mut cogged = vec![false; hallu.len()];
                let mut any = false;
                for w in syn.mention_list(answer) {
                    named += 1;
                    if words.safe.contains(&w) {
                        continue;
                    }
                    if let Some(k) = truth.iter().position(|t| *t == w || assoc(t).contains(&w)) {
                        covered[k] = true;
                        continue;
                    }
                    if let Some(k) = hallu.iter().position(|h| *h == w || assoc(h).contains(&w)) {
                        cogged[k] = true;
                    }
                    unsafe_ += 1;
                    any = true;
                }
                cover += covered.iter().filter(|c| **c).count();
                cover_n += truth.len();
                cog += cogged.iter().filter(|c| **c).count();
                cog_n += hallu.len();
                hal += usize::from(any);
            }
            Truth::Discriminative { yes, .. } => disc.push((engine::hallucination::yes_no(answer), *yes)),
            _ => {}
        }
    }
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let d = binary_metrics(&disc, false);
    let chair = ratio(unsafe_, named);
    serde_json::json!({ "suite": "amber", "images": gen, "chair_i": chair, "cover": ratio(cover, cover_n), "hal": ratio(hal, gen),
        "cog": ratio(cog, cog_n), "questions": d.n, "accuracy": d.accuracy, "precision": d.precision, "recall": d.recall, "f1": d.f1,
        "amber_score": (1.0 - chair + d.f1) / 2.0 })
}

/// MMHal-Bench's questions (its `response_template.json`: a list of `{"question_type", "question_topic",
/// "image_id", "image_src", "image_content", "question", "gt_answer", ...}`); the image is the file named like the
/// last part of `image_src` in the images folder (or `image` when an entry has that key).
fn mmhal_items(src: &BenchSource, data: &[u8], name: &str, limit: usize) -> Result<Vec<BenchItem>> {
    #[derive(serde::Deserialize)]
    struct Q {
        #[serde(default)]
        question_type: String,
        #[serde(default)]
        image_src: Option<String>,
        #[serde(default)]
        image: Option<String>,
        #[serde(default)]
        image_content: Vec<String>,
        question: String,
        gt_answer: String,
    }
    let qs: Vec<Q> = serde_json::from_slice(data).with_context(|| {
        format!("{name}: not MMHal-Bench's question file ([{{\"question\", \"gt_answer\", \"image_src\", \"image_content\", ...}}])")
    })?;
    qs.into_iter()
        .take(limit)
        .enumerate()
        .map(|(k, q)| {
            let file = match (q.image, q.image_src) {
                (Some(f), _) => f,
                (None, Some(url)) => url.rsplit('/').next().unwrap_or_default().to_string(),
                (None, None) => bail!("{name}: question {} names no image (image_src or image)", k + 1),
            };
            Ok(BenchItem {
                image: image_path(&src.images, &file, name)?,
                name: file,
                prompt: q.question,
                truth: Truth::Judged {
                    question_type: q.question_type,
                    image_content: q.image_content,
                    gt_answer: q.gt_answer,
                },
            })
        })
        .collect()
}

/// What the judge model reads for one MMHal-Bench answer (rlaifd's wording of the benchmark's 0-6 scale: the
/// judge sees the image's listed contents and the standard answer, not the image).
pub fn mmhal_judge_prompt(question: &str, image_content: &[String], gt_answer: &str, answer: &str) -> String {
    format!(
        "You are judging an answer that an image assistant gave to a question about an image you cannot see. \
         Decide whether the answer is informative and whether it claims anything that is not in the image \
         (a hallucination).\n\
         Image contents: {}\nQuestion: {question}\nStandard answer: {gt_answer}\nAssistant's answer: {answer}\n\
         Rate the answer with one number: 6 informative and no hallucination; 5 somewhat informative, no \
         hallucination; 4 not informative, no hallucination; 3 informative, some hallucination; 2 somewhat \
         informative, hallucination; 1 not informative, hallucination; 0 the answer contradicts the image. \
         Reply as \"Rating: N\".",
        image_content.join(", ")
    )
}

/// The rating in a judge's reply: the first number after "rating" when there is one, else the last number in it,
/// if it is from 0 to 6.
pub fn judge_rating(reply: &str) -> Option<u8> {
    let lower = reply.to_lowercase();
    let numbers = |s: &str| -> Vec<u64> {
        s.split(|c: char| !c.is_ascii_digit()).filter(|t| !t.is_empty()).filter_map(|t| t.parse().ok()).collect()
    };
    let pick = match lower.rfind("rating").map(|i| numbers(&lower[i..])) {
        Some(after) if !after.is_empty() => after.first().copied(),
        _ => numbers(&lower).last().copied(),
    };
    pick.filter(|n| *n <= 6).map(|n| n as u8)
}

/// MMHal-Bench's figures: the mean rating, the hallucination rate (ratings below 3), the mean rating per question
/// type, over the answers the judge rated; `unjudged` counts replies with no rating in them.
fn mmhal_metrics(ratings: &[(String, Option<u8>)]) -> serde_json::Value {
    let judged: Vec<(&str, u8)> = ratings.iter().filter_map(|(t, r)| r.map(|r| (t.as_str(), r))).collect();
    let mean = |v: &[u8]| {
        if v.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::json!(v.iter().map(|&r| r as f64).sum::<f64>() / v.len() as f64)
        }
    };
    let all: Vec<u8> = judged.iter().map(|(_, r)| *r).collect();
    let mut per_type: std::collections::BTreeMap<&str, Vec<u8>> = Default::default();
    for (t, r) in &judged {
        per_type.entry(t).or_default().push(*r);
    }
    let per_type: serde_json::Map<String, serde_json::Value> =
        per_type.into_iter().map(|(t, v)| (t.to_string(), mean(&v))).collect();
    let rate = if all.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::json!(all.iter().filter(|&&r| r < 3).count() as f64 / all.len() as f64)
    };
    serde_json::json!({ "suite": "mmhal", "questions": ratings.len(), "judged": all.len(), "unjudged": ratings.len() - all.len(),
        "average_score": mean(&all), "hallucination_rate": rate, "per_type": per_type })
}

/// AMBER's side files for a query file, where its repository keeps them: `annotations.json`, `relation.json` and
/// `safe_words.txt` in the query file's folder or the folder above it (AMBER's `data/` and `data/query/`).
pub fn amber_side_files(query: &Path) -> (Option<PathBuf>, Option<PathBuf>, Option<PathBuf>) {
    let dirs: Vec<&Path> = query.parent().into_iter().flat_map(|d| std::iter::once(d).chain(d.parent())).collect();
    let find = |f: &str| dirs.iter().map(|d| d.join(f)).find(|p| p.is_file());
    (find("annotations.json"), find("relation.json"), find("safe_words.txt"))
}

/// A gate on a benchmark (`loop.gate = "SUITE:FILE"`): the suite and its data file.
pub fn parse_gate(spec: &str) -> Result<Option<(Suite, PathBuf)>> {
    if spec.is_empty() {
        return Ok(None);
    }
    let Some((suite, path)) = spec.split_once(':') else {
        bail!("`{spec}`: expected SUITE:FILE, e.g. objhal:/data/coco/instances_val2014.json or pope:/data/pope/coco_pope_adversarial.json")
    };
    let suite = match suite {
        "objhal" => Suite::Objhal,
        "pope" => Suite::Pope,
        "amber" => Suite::Amber,
        other => bail!("`{spec}`: unknown suite `{other}` (objhal, pope or amber)"),
    };
    if path.is_empty() {
        bail!("`{spec}`: no data file after `{}:`", suite.name());
    }
    Ok(Some((suite, PathBuf::from(path))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coco_synonyms_find_categories_with_plurals_and_two_word_names() {
        let syn = Synonyms::coco();
        let m = syn.mentions("Two men ride motorbikes past a traffic light; puppies sit on a sofa near hot dogs.");
        let want: BTreeSet<String> = ["person", "motorcycle", "traffic light", "dog", "couch", "hot dog"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(m, want);
        // "hot dog" is one object (the longest name wins), not a dog.
        assert_eq!(syn.mentions("a hot dog"), ["hot dog".to_string()].into_iter().collect());
        assert!(syn.mentions("The sky is blue.").is_empty());
    }

    #[test]
    fn chair_counts_like_the_paper() {
        let syn = Synonyms::coco();
        let gt = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let items = vec![
            ("A dog and a cat on a bed.".to_string(), gt(&["dog", "bed"])),
            ("A man with a kite.".to_string(), gt(&["person", "kite", "car"])),
        ];
        let c = chair(&syn, &items);
        assert_eq!(c.chair_s, 0.5); // the first names an absent cat
        assert!((c.chair_i - 1.0 / 5.0).abs() < 1e-12); // 5 objects named, 1 absent
        assert!((c.cover - 4.0 / 5.0).abs() < 1e-12); // 4 of 5 ground-truth objects named
    }

    #[test]
    fn pope_reads_answers_as_its_script_does() {
        assert!(pope_answer("Yes, there is a dog."));
        assert!(!pope_answer("No, there is no dog."));
        assert!(!pope_answer("There is not a dog in the image."));
        assert!(pope_answer("There is a dog. No cat."));
        assert!(pope_answer("I cannot tell"));
    }

    #[test]
    fn judge_ratings_are_read_from_the_reply() {
        assert_eq!(judge_rating("The answer is informative. Rating: 5"), Some(5));
        assert_eq!(judge_rating("rating: 2 (it names a dog)"), Some(2));
        assert_eq!(judge_rating("I would give it a 4."), Some(4));
        assert_eq!(judge_rating("there is a red circle ."), None);
        assert_eq!(judge_rating("9 out of 10"), None);
        let m =
            mmhal_metrics(&[("attribute".into(), Some(6)), ("attribute".into(), Some(2)), ("counting".into(), None)]);
        assert_eq!(m["average_score"], 4.0);
        assert_eq!(m["hallucination_rate"], 0.5);
        assert_eq!(m["unjudged"], 1);
        assert_eq!(m["per_type"]["attribute"], 4.0);
    }

    #[test]
    fn image_names_stay_inside_the_folder() {
        let d = Path::new("/data/images");
        assert!(image_path(d, "a/b.jpg", "f").is_ok());
        for bad in ["../x.jpg", "/etc/passwd", "a/../../x", ""] {
            assert!(image_path(d, bad, "f").is_err(), "{bad}");
        }
    }

    #[test]
    fn a_synonym_under_two_categories_is_refused() {
        let e = Synonyms::parse("dog, pup\ncat, pup\n", "s.txt").err().unwrap().to_string();
        assert!(e.contains("pup") && e.contains("line 2"), "{e}");
    }
}
