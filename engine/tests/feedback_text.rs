//! Behaviour of the RLAIF-V "divide" text utilities: rule-based claim splitting, parsing of an extraction
//! LLM's output, and yes/no question construction. Every case states the exact output a user gets.

use engine::feedback::text::*;

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

// ---- split_claims: sentences -----------------------------------------------------------------------------

#[test]
fn sentences_do_not_split_at_abbreviations_decimals_or_initials() {
    let answer = "Dr. Smith measured 3.5 m, e.g. the length of the car. The car is red! \
                  The U.S. flag is visible. J. K. Rowling wrote it.";
    assert_eq!(
        split_claims(answer),
        strings(&[
            "Dr. Smith measured 3.5 m, e.g. the length of the car.",
            "The car is red.",
            "The U.S. flag is visible.",
            "J. K. Rowling wrote it.",
        ])
    );
}

#[test]
fn etc_ends_a_sentence_only_before_a_capital_and_titles_never_do() {
    assert_eq!(
        split_claims("There are cups, plates, etc. The table is wooden."),
        strings(&["There are cups, plates, etc.", "The table is wooden."])
    );
    assert_eq!(
        split_claims("Cups, plates, etc. are on the table."),
        strings(&["Cups, plates, etc. are on the table."])
    );
    assert_eq!(
        split_claims("Mr. Brown is at No. 5 Main St. today."),
        strings(&["Mr. Brown is at No. 5 Main St. today."])
    );
}

#[test]
fn line_breaks_and_list_markers_separate_claims_and_lead_ins_are_dropped() {
    let answer = "The image shows:\n- A red car.\n* A blue bus\n1. Two dogs are playing\n2) A cat sits on a mat";
    assert_eq!(
        split_claims(answer),
        strings(&["A red car.", "A blue bus.", "Two dogs are playing.", "A cat sits on a mat."])
    );
}

#[test]
fn claims_are_trimmed_capitalised_and_end_with_one_period() {
    assert_eq!(split_claims("  the cat is orange  \n\n"), strings(&["The cat is orange."]));
    assert_eq!(split_claims("The car is red!!!"), strings(&["The car is red."]));
    assert_eq!(split_claims("The car is red... The bus is blue"), strings(&["The car is red.", "The bus is blue."]));
    assert_eq!(split_claims("\u{4E00}\u{53EA}\u{732B}\u{3002}"), strings(&["\u{4E00}\u{53EA}\u{732B}."]));
}

// ---- split_claims: clauses -------------------------------------------------------------------------------

#[test]
fn compound_sentence_splits_into_self_contained_claims() {
    // The example from the split_claims doc comment.
    assert_eq!(
        split_claims("The dog is brown, and it is sleeping. It looks so peaceful!"),
        strings(&["The dog is brown.", "The dog is sleeping."])
    );
    assert_eq!(
        split_claims("A cat is white; it is on the sofa."),
        strings(&["A cat is white.", "The cat is on the sofa."])
    );
    assert_eq!(
        split_claims("The dogs are big, but they are calm."),
        strings(&["The dogs are big.", "The dogs are calm."])
    );
    assert_eq!(
        split_claims("The car is red, and the bus is parked near it."),
        strings(&["The car is red.", "The bus is parked near it."])
    );
    assert_eq!(
        split_claims("The man is tall, while the woman is short. The sky is blue whereas the grass is green."),
        strings(&["The man is tall.", "The woman is short.", "The sky is blue.", "The grass is green."])
    );
    assert_eq!(split_claims("There is a car, and it is red."), strings(&["There is a car.", "The car is red."]));
}

#[test]
fn a_pronoun_with_nothing_to_stand_for_is_dropped() {
    // "it" cannot refer to "The dogs" (plural verb), and "a car parked" is not a bare noun phrase: the clause
    // cannot be checked on its own, so it is not a claim.
    assert_eq!(split_claims("The dogs are big, and it is raining."), strings(&["The dogs are big."]));
    assert_eq!(split_claims("There is a car parked, and it is red."), strings(&["There is a car parked."]));
    assert_eq!(split_claims("It is red. They are sleeping."), Vec::<String>::new());
    // The example: "the other" refers back to something the claim does not name.
    assert_eq!(
        split_claims("Two dogs are in the yard. One of them is brown. The other is chasing it."),
        strings(&["Two dogs are in the yard."])
    );
}

#[test]
fn a_pronoun_opening_a_sentence_takes_the_subject_of_the_sentence_before() {
    assert_eq!(split_claims("There is a cat. It is black."), strings(&["There is a cat.", "The cat is black."]));
    assert_eq!(
        split_claims("A dog sits on the grass. It is brown. They are happy."),
        strings(&["A dog sits on the grass.", "The dog is brown."])
    );
    assert_eq!(
        split_claims("The image shows a dog. It is sleeping on a red sofa."),
        strings(&["There is a dog.", "The dog is sleeping on a red sofa."]),
        "the dog, not the image"
    );
}

#[test]
fn lists_of_objects_become_one_claim_per_object() {
    // The example.
    assert_eq!(
        split_claims("The image shows a kitchen with white cabinets, a refrigerator, and a wooden table."),
        strings(&["There is a kitchen with white cabinets.", "There is a refrigerator.", "There is a wooden table."])
    );
    assert_eq!(
        split_claims("There is a red car and a blue bus."),
        strings(&["There is a red car.", "There is a blue bus."])
    );
    assert_eq!(
        split_claims("There is a red car, and a blue bus."),
        strings(&["There is a red car.", "There is a blue bus."])
    );
    assert_eq!(
        split_claims("There are two cats, a dog and some birds."),
        strings(&["There are two cats.", "There is a dog.", "There are some birds."])
    );
    assert_eq!(
        split_claims("The table has a vase, a book, and a lamp."),
        strings(&["The table has a vase.", "The table has a book.", "The table has a lamp."])
    );
    assert_eq!(
        split_claims("The man is wearing a red shirt, blue jeans, and a hat."),
        strings(&["The man is wearing a red shirt.", "The man is wearing blue jeans.", "The man is wearing a hat."])
    );
    assert_eq!(split_claims("The cat is black and white."), strings(&["The cat is black.", "The cat is white."]));
}

#[test]
fn relations_appositions_and_dependent_phrases_stay_one_claim() {
    for whole in [
        "A man is holding an umbrella, while walking down the street.",
        "The cat is between a box and a bag.",
        "The dog, a golden retriever, is sleeping.",
        "A man and a woman are walking.",
        "The image shows a dog, which is brown, and a cat.",
        "Two dogs are playing.",
        "The car is red or orange.",
    ] {
        assert_eq!(split_claims(whole), strings(&[whole]), "{whole:?}");
    }
}

// ---- split_claims: subjectivity ----------------------------------------------------------------------------

#[test]
fn opinions_mood_speculation_and_questions_are_dropped() {
    let answer = "I think the car is red. The room is cozy and inviting. The lamp creates a warm atmosphere. \
                  Overall, the scene is calm. Is the dog asleep? The chair is black, and it looks beautiful. \
                  The table is probably made of oak. In my opinion, the sofa is too big. \
                  The candles add to the romantic ambiance. There is a lamp. The sofa looks very comfortable. \
                  It seems quite old.";
    assert_eq!(split_claims(answer), strings(&["The chair is black.", "There is a lamp."]));
}

#[test]
fn filters_match_whole_words_only() {
    // "niche" is not "nice", "personalised" is not "personally", "overalls" is not "overall".
    assert_eq!(
        split_claims("The niche holds a vase. A personalised plate is on the car. Overalls hang on a hook."),
        strings(&["The niche holds a vase.", "A personalised plate is on the car.", "Overalls hang on a hook."])
    );
}

// ---- parse_claim_lines -------------------------------------------------------------------------------------

#[test]
fn claim_lines_accept_every_list_style_and_skip_chatter() {
    let output = "Sure! Here are the claims:\r\n\
                  ### Facts\r\n\
                  - The car is red.\r\n\
                  \r\n\
                  * the car is RED\r\n\
                  \u{2022} A dog is brown\r\n\
                  1. \"A cat sits on the mat.\"\r\n\
                  2) Two birds are flying   \r\n\
                  (3) A tree is green\r\n\
                  4. **The sky is blue.**\r\n\
                  - Objects:\r\n\
                  Let me know if you need anything else!\r\n";
    assert_eq!(
        parse_claim_lines(output),
        strings(&[
            "The car is red.",
            "A dog is brown.",
            "A cat sits on the mat.",
            "Two birds are flying.",
            "A tree is green.",
            "The sky is blue.",
        ])
    );
}

#[test]
fn claim_lines_meaning_nothing_give_no_claims() {
    for output in ["None", "N/A", "- None.", "No claims.", "Claims:\n(none)", "", "\n\r\n  \n"] {
        assert_eq!(parse_claim_lines(output), Vec::<String>::new(), "output {output:?}");
    }
    assert_eq!(parse_claim_lines("- None\n- A cat is black"), strings(&["A cat is black."]));
}

#[test]
fn claim_lines_without_markers_fall_back_to_sentences() {
    assert_eq!(
        parse_claim_lines("Claims:\nThe car is red. The bus is blue.\nSure.\nThe car is red."),
        strings(&["The car is red.", "The bus is blue."])
    );
}

#[test]
fn a_listing_read_for_the_loop_keeps_only_complete_self_contained_facts() {
    let listing = "Claims:\n- There is a dog.\n- It is brown.\n- The room looks very cozy.\n- The dog is sleeping\n- There is a ca";
    assert_eq!(
        read_claim_listing(listing, true),
        strings(&["There is a dog.", "The dog is brown.", "The dog is sleeping."]),
        "the cut-off last line is dropped, the pronoun resolved, the opinion left out"
    );
    assert_eq!(read_claim_listing("- There is a cat", false), strings(&["There is a cat."]));
    assert!(read_claim_listing("- There is a ca", true).is_empty(), "a single cut-off line");
    assert!(read_claim_listing("The dog is brown and the cat is black.", false).is_empty(), "no list line");
    assert!(read_claim_listing("- None", false).is_empty());
    assert!(read_claim_listing("- It is red.\n- They are big.", false).is_empty(), "nothing to stand for");
    assert_eq!(read_claim_listing("- A cat is black.\n- a cat is black", false), strings(&["A cat is black."]));
}

#[test]
fn claim_lines_keep_numbers_that_are_not_markers() {
    assert_eq!(
        parse_claim_lines("- 3.5 liters of water are in the jug\n- -5 degrees is shown on the thermometer"),
        strings(&["3.5 liters of water are in the jug.", "-5 degrees is shown on the thermometer."])
    );
}

// ---- parse_question ----------------------------------------------------------------------------------------

#[test]
fn question_is_found_in_messy_outputs() {
    let cases: &[(&str, Option<&str>)] = &[
        ("Question: Is the car red?", Some("Is the car red?")),
        ("Sure! Here is the question: \"Are there two dogs?\"", Some("Are there two dogs?")),
        ("**Question:** Is it 10:30 on the clock?", Some("Is it 10:30 on the clock?")),
        ("Q: is the bus blue?", Some("Is the bus blue?")),
        ("Here you go.\r\n\r\n1. \"Does the man have a hat?\"\r\n2. Is he tall?", Some("Does the man have a hat?")),
        ("- Is the car red?\nIs the bus blue?", Some("Is the car red?")),
        ("\u{201C}Is the cat orange?\u{201D}", Some("Is the cat orange?")),
        ("The car is red.", None),
        ("?", None),
        ("", None),
    ];
    for &(output, expected) in cases {
        assert_eq!(parse_question(output).as_deref(), expected, "output {output:?}");
    }
}

// ---- claim_to_question -------------------------------------------------------------------------------------

#[test]
fn claim_to_question_follows_each_rule() {
    let cases = [
        ("There is a red car.", "Is there a red car?"),
        ("There are two dogs on the grass.", "Are there two dogs on the grass?"),
        ("There's a cat.", "Is there a cat?"),
        ("The car is red.", "Is the car red?"),
        ("Two dogs are playing.", "Are two dogs playing?"),
        ("The car was parked.", "Was the car parked?"),
        ("The windows were open.", "Were the windows open?"),
        ("The man has a hat.", "Does the man have a hat?"),
        ("The dogs have collars.", "Do the dogs have collars?"),
        ("The house has been painted.", "Has the house been painted?"),
        ("The cat can jump.", "Can the cat jump?"),
        ("NASA is a space agency.", "Is NASA a space agency?"),
        ("I am in the photo.", "Am I in the photo?"),
        // Lexical verbs take "do"; an answer about the image asks whether the thing is there.
        ("A man holds an umbrella.", "Does a man hold an umbrella?"),
        ("The cat lies on the sofa.", "Does the cat lie on the sofa?"),
        ("The girl carries a bag.", "Does the girl carry a bag?"),
        ("The boy touches the fence.", "Does the boy touch the fence?"),
        ("The image shows two cats on a bed.", "Are there two cats on a bed in the image?"),
        ("This picture depicts a red bus.", "Is there a red bus in the image?"),
        // Fallbacks keep the meaning when fronting a verb would garble it.
        ("A man walks to the car.", "Is it true that a man walks to the car?"),
        ("In the corner, a lamp is on.", "Is it true that in the corner, a lamp is on?"),
        ("The man who is tall has a hat.", "Is it true that the man who is tall has a hat?"),
        // Leftover list marker and emphasis from an LLM line.
        ("1. **The car is red.**", "Is the car red?"),
    ];
    for (claim, question) in cases {
        assert_eq!(claim_to_question(claim), question, "claim {claim:?}");
    }
    assert_eq!(claim_to_question(""), "");
    assert_eq!(claim_to_question("?!."), "");
}

// ---- prompts -----------------------------------------------------------------------------------------------

#[test]
fn prompts_embed_their_input_once_and_ask_for_the_parsed_format() {
    let prompt = claim_extraction_prompt("  A red car is parked.  ");
    assert!(prompt.contains("\nA red car is parked.\n"));
    assert!(!prompt.contains("{answer}"));
    assert!(CLAIM_EXTRACTION_PROMPT.contains("\"- \""));
    assert_eq!(CLAIM_EXTRACTION_PROMPT.matches("{answer}").count(), 1);

    let prompt = question_prompt("The car is red.");
    assert!(prompt.contains("Statement: The car is red.\n"));
    assert!(!prompt.contains("{claim}"));
    assert_eq!(QUESTION_PROMPT.matches("{claim}").count(), 1);
    // An answer that itself contains the placeholder text is inserted verbatim, not expanded again.
    assert!(claim_extraction_prompt("say {answer}").contains("say {answer}"));
}

// ---- robustness --------------------------------------------------------------------------------------------

#[test]
fn degenerate_inputs_give_empty_results() {
    for input in ["", "   ", "\n\n", "...", "?!?", "- \n* \n1. ", "\u{1F600}\u{1F431}"] {
        assert_eq!(split_claims(input), Vec::<String>::new(), "input {input:?}");
        assert_eq!(parse_claim_lines(input), Vec::<String>::new(), "input {input:?}");
        assert_eq!(parse_question(input), None, "input {input:?}");
    }
}

#[test]
fn non_ascii_text_is_kept_intact() {
    assert_eq!(
        split_claims("\u{1F600} the cat \u{1F431} is orange. \u{00C9}lodie is here, and she is smiling."),
        strings(&["\u{1F600} the cat \u{1F431} is orange.", "\u{00C9}lodie is here.", "\u{00C9}lodie is smiling."])
    );
    assert_eq!(claim_to_question("\u{00C9}lodie is smiling."), "Is \u{00E9}lodie smiling?");
    assert_eq!(
        parse_claim_lines("\u{2022} \u{00FC}ber-cool \u{1F697} is red"),
        strings(&["\u{00DC}ber-cool \u{1F697} is red."])
    );
}

#[test]
fn very_long_inputs_return_promptly() {
    let started = std::time::Instant::now();

    let repeated = "The dog is brown, and it is sleeping. ".repeat(2_700); // ~100k chars
    let claims = split_claims(&repeated);
    assert_eq!(claims.len(), 2 * 2_700);
    assert_eq!(claims[1], "The dog is sleeping.");

    // One 100k-character run-on sentence, one 100k-character word, emoji, dots.
    let run_on = "a cat, and a dog, and it is big; ".repeat(3_000);
    let long_word = "x".repeat(100_000);
    let emoji = "\u{1F600}.\u{1F431}! ".repeat(20_000);
    let dots = ".".repeat(100_000);
    let initials = "e.g.".repeat(25_000);
    for input in [&run_on, &long_word, &emoji, &dots, &initials] {
        let claims = split_claims(input);
        assert!(claims.iter().all(|c| c.ends_with('.')));
        let _ = parse_claim_lines(input);
        let _ = parse_question(input);
        let question = claim_to_question(input);
        assert!(question.is_empty() || question.ends_with('?'));
    }
    assert_eq!(split_claims(&long_word), vec![format!("X{}.", &long_word[1..])]);

    assert!(started.elapsed().as_secs_f64() < 1.0, "took {:?}", started.elapsed());
}

#[test]
fn random_mixes_of_tricky_fragments_never_panic() {
    // Fragments chosen to hit every branch that slices text: markers, abbreviations, connectors, quotes,
    // multi-byte characters next to punctuation.
    const FRAGMENTS: &[&str] = &[
        ".",
        "!",
        "?",
        " ",
        "\n",
        "\r\n",
        "- ",
        "* ",
        "1. ",
        "(2) ",
        "3) ",
        "\u{2022} ",
        "e.g.",
        "Mr.",
        "3.5",
        "There is",
        "There's",
        "it",
        "they",
        " is ",
        " has ",
        ", and ",
        "; ",
        " whereas ",
        ", while ",
        "\"",
        "\u{201C}",
        "\u{2019}",
        "\u{00E9}",
        "\u{1F600}",
        "\u{3002}",
        "Question:",
        ":",
        "#",
        "**",
        "the dog",
        "A",
        "None",
        "etc.",
        "I think",
        "U.S.",
    ];
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = || {
        // xorshift64: deterministic, no dependency.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..3_000 {
        let len = (next() % 24) as usize;
        let text: String = (0..len).map(|_| FRAGMENTS[(next() % FRAGMENTS.len() as u64) as usize]).collect();
        for claim in split_claims(&text).iter().chain(parse_claim_lines(&text).iter()) {
            assert!(claim.ends_with('.'), "claim {claim:?} from {text:?}");
            let question = claim_to_question(claim);
            assert!(question.ends_with('?'), "question {question:?} from claim {claim:?}");
        }
        if let Some(question) = parse_question(&text) {
            assert!(question.ends_with('?'), "question {question:?} from {text:?}");
        }
    }
}
