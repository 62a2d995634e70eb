"""English sentences for the MiniLM evaluation set of tools/real_models.py (no dependencies).

Two sources, both offline: the hand-written sentences below (everyday topics, so the set is not
all technical prose), then sentences taken from English text that ships with Python itself
(`pydoc_data.topics`, the language reference). `sentences(n)` is deterministic for a given
Python version; tools/real_models.py stores the chosen sentences next to their token ids, so
the cached evaluation set does not change when Python does.
"""

from __future__ import annotations

import random
import re

HANDWRITTEN: tuple[str, ...] = (
    "The train to the coast leaves every hour from platform four.",
    "She planted tomatoes along the south wall where the sun stays longest.",
    "Our flight was delayed by three hours because of fog at the airport.",
    "A warm bowl of soup is the best thing on a cold winter evening.",
    "The museum opens at ten and is free on the first Sunday of the month.",
    "He forgot his umbrella and arrived at the meeting soaked to the bone.",
    "The children built a sandcastle that the tide washed away by noon.",
    "Please remember to water the plants while I am away next week.",
    "The bakery on the corner sells fresh bread until it runs out.",
    "I have been learning to play the piano for almost two years.",
    "The river flooded the low fields after a week of heavy rain.",
    "They adopted a small grey cat from the animal shelter.",
    "The library extended its opening hours during the exam period.",
    "A good night's sleep improves memory and concentration.",
    "The mountain trail is steep but the view from the top is worth it.",
    "Coffee prices rose sharply after a poor harvest in Brazil.",
    "The central bank kept interest rates unchanged this quarter.",
    "Unemployment fell to its lowest level in a decade.",
    "The company reported higher profits thanks to strong online sales.",
    "Investors worried that inflation would remain high for longer.",
    "The new stadium will seat more than sixty thousand fans.",
    "The home team scored twice in the final ten minutes to win the match.",
    "She finished the marathon in just under four hours.",
    "The tennis final was interrupted by rain in the second set.",
    "The coach praised the young goalkeeper after the game.",
    "Doctors recommend at least thirty minutes of exercise a day.",
    "The vaccine trial enrolled several thousand volunteers.",
    "Drinking enough water helps the body regulate its temperature.",
    "The hospital opened a new wing for children with rare diseases.",
    "Regular hand washing reduces the spread of many infections.",
    "The telescope captured images of a galaxy billions of light years away.",
    "Bees play a vital role in pollinating crops and wild flowers.",
    "The glacier has retreated by several kilometres over the last century.",
    "Volcanic ash grounded flights across northern Europe.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "The probe sent back detailed photographs of the planet's rings.",
    "Earthquakes are common along the edges of tectonic plates.",
    "Rising sea levels threaten low-lying islands in the Pacific.",
    "The city council approved a plan to build more cycle lanes.",
    "Voters will choose a new mayor in the spring election.",
    "The parliament debated the budget late into the night.",
    "The treaty was signed by representatives of twelve countries.",
    "Protesters gathered outside the ministry to demand cleaner air.",
    "The novel tells the story of a family across three generations.",
    "The orchestra performed a symphony that had not been heard in a century.",
    "Her first film won an award at a small festival in Italy.",
    "The painting was sold at auction for a record price.",
    "The band announced a farewell tour after thirty years together.",
    "He reads a chapter of a mystery novel before going to sleep.",
    "The poem describes the silence of a forest after snowfall.",
    "The recipe calls for two eggs, a cup of flour and a pinch of salt.",
    "Let the dough rest for an hour before you roll it out.",
    "Roast the vegetables until they are golden at the edges.",
    "The restaurant is famous for its spicy noodle soup.",
    "Add the garlic only at the end so that it does not burn.",
    "My phone battery runs out before the end of the day.",
    "The update fixed a bug that made the app crash on startup.",
    "Restart the router if the internet connection keeps dropping.",
    "The laptop is light enough to carry around all day.",
    "Back up your photos before you reinstall the operating system.",
    "The printer is out of paper again.",
    "Self-driving cars still struggle in heavy snow.",
    "The search engine returned thousands of irrelevant results.",
    "Cloud storage makes it easy to share large files with colleagues.",
    "The password must contain at least twelve characters.",
    "Where is the nearest pharmacy that is open on Sunday?",
    "Could you tell me how to get to the railway station?",
    "How long does it take to boil an egg?",
    "What time does the last bus leave tonight?",
    "Why is the sky blue during the day and red at sunset?",
    "Which language is spoken in the north of the country?",
    "Is it safe to swim in the lake in early spring?",
    "How many people live in the capital city?",
    "What is the difference between weather and climate?",
    "Who wrote the letter that was found in the old desk?",
    "The old bridge was closed for repairs for most of the summer.",
    "The ferry crossing was rough and many passengers felt seasick.",
    "The hotel room had a balcony overlooking the harbour.",
    "We rented bicycles and rode along the canal to the next village.",
    "The market was crowded with tourists buying souvenirs.",
    "The teacher asked the students to write an essay about their town.",
    "Mathematics becomes easier when you practise a little every day.",
    "The university offers evening courses for working adults.",
    "The exam results will be published at the end of July.",
    "Learning a second language opens doors to other cultures.",
    "The dog barked at the postman every morning without fail.",
    "A fox crossed the road just in front of our car.",
    "The owl hunts at night and sleeps during the day.",
    "Elephants can recognise themselves in a mirror.",
    "The horse refused to jump over the last fence.",
    "The factory switched to solar power to cut its energy bill.",
    "Electric buses now run on most routes in the city centre.",
    "Recycling paper saves both trees and water.",
    "The wind farm produces enough electricity for forty thousand homes.",
    "Insulating the roof kept the house warm through the winter.",
    "I am sorry, but I cannot come to your party on Saturday.",
    "Thank you for the lovely flowers you sent last week.",
    "Let us meet in front of the cinema at half past seven.",
    "Do not forget to bring your passport to the airport.",
    "The meeting has been moved from Tuesday to Thursday afternoon.",
    "The package was delivered to the wrong address.",
    "The shop will refund the money if the item is returned within a month.",
    "Prices in the supermarket have gone up again this year.",
    "The kettle is broken, so we boiled water in a saucepan.",
    "The neighbours are renovating their kitchen and the noise never stops.",
    "A sudden storm knocked out the power for the whole street.",
    "The firefighters rescued a kitten stuck at the top of a tree.",
    "The police closed the motorway after a serious accident.",
    "Witnesses said the car was travelling far too fast.",
    "The judge postponed the trial until the new year.",
    "The ancient city was buried under ash for nearly two thousand years.",
    "The castle was built in the twelfth century to guard the valley.",
    "Historians still argue about the causes of the war.",
    "The explorer kept a diary throughout the long journey north.",
    "The first printed books were extremely expensive.",
    "A neural network learns its weights from examples.",
    "Quantization stores weights with fewer bits to save memory.",
    "The compiler removes code whose results are never used.",
    "Sorting a list of a million numbers takes less than a second.",
    "The database query was slow until we added an index.",
)

_WORD = re.compile(r"[A-Za-z][a-z]+")


def _shipped_text() -> list[str]:
    """Sentences of Python's own language reference (pydoc_data.topics), lightly filtered to
    prose: 8-30 words, mostly alphabetic, no code or markup."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return []
    out: list[str] = []
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", topics[key])
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
            s = s.strip()
            words = s.split()
            if not 8 <= len(words) <= 30 or not s.endswith("."):
                continue
            if any(c in s for c in "*`_{}[]=<>|\\:;#@$%^~") or "..." in s or "--" in s:
                continue
            if sum(bool(_WORD.fullmatch(w.strip(",.()'\"?!-"))) for w in words) < 0.85 * len(words):
                continue
            out.append(s)
    return sorted(set(out))


def sentences(n: int, seed: int = 0) -> list[str]:
    """`n` distinct sentences: all hand-written ones first, then shipped text sampled with `seed`;
    the result is shuffled with the same seed."""
    base = list(dict.fromkeys(HANDWRITTEN))
    rng = random.Random(seed)
    extra = [s for s in _shipped_text() if s not in base]
    rng.shuffle(extra)
    out = (base + extra)[:n]
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} sentences available, {n} asked")
    rng.shuffle(out)
    return out
