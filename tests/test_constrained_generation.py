"""Constrained generation on the text stream and the turn-taking signal inside the streaming session.

On the briefly trained sample model (fixture `demo_model_dir`) and the user codes of held-out sample dialogues:
forced text (`say`, `forced_text`, `prompt_text`) comes out in order with only padding between its tokens; banned
tokens never come out across seeds; `max_turn_words` and `min_silence_frames` hold the text stream on padding as the
user's voice activity (the turn-taking table) says; `user_turn` is `turn_taking_signal` of the user branch's logits;
`turn_hold_threshold` holds word starts; speculation stays lossless with every constraint on.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers import GREEDY, PARITY_CONFIGS
from hf_moshi_userpred import MoshiUserPredConfig, MoshiUserPredForConditionalGeneration
from hf_moshi_userpred.data.audio import load_tokenizer
from hf_moshi_userpred.data.encoding import EncodedDialogues
from hf_moshi_userpred.data.voice_activity import delay0_user_codebook, dialogue_alignments, fit_turn_taking_statistics
from hf_moshi_userpred.evaluation.turn_taking import turn_taking_signal

pytestmark = pytest.mark.usefixtures("one_thread")
FRAMES = 90  # of each of two held-out dialogues
SAID = "hello welcome tomorrow"  # 1, 4 and 3 pieces in the sample's tokenizer


@pytest.fixture(scope="module")
def demo(demo_model_dir):
    model = MoshiUserPredForConditionalGeneration.from_pretrained(demo_model_dir).eval()
    # The turn-taking signal of these tests is the table's; the demo model's voice-activity head, which replaces
    # it when present, is tested in test_voice_activity.py.
    model.voice_activity_head, model.config.voice_activity_horizon = None, 0
    c = model.config
    encoded = demo_model_dir.parent / "encoded"
    stats = fit_turn_taking_statistics(EncodedDialogues(encoded / "train"), dialogue_alignments(encoded / "train"), c)
    held_out = EncodedDialogues(encoded / "eval")
    user = torch.stack([held_out[i]["codes"][1 + c.dep_q :, :FRAMES] for i in (0, 1)]).long()
    tokenizer = load_tokenizer(demo_model_dir / "tokenizer.model")
    padding = (c.existing_text_padding_id, c.existing_text_end_padding_id)
    return SimpleNamespace(model=model, config=c, stats=stats, table=stats.table(), user=user, tokenizer=tokenizer,
                           padding=torch.tensor(padding), said=[tokenizer.encode(w) for w in SAID.split()])


def word_starts(text: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """`[B, T]` where a word starts: a token that is neither padding nor end-of-padding after one that is (the
    stream starts after padding)."""
    is_word = ~torch.isin(text, padding)
    before = torch.cat([torch.zeros_like(is_word[:, :1]), is_word[:, :-1]], dim=1)
    return is_word & ~before


def user_silent(demo, user: torch.Tensor, calls: int) -> torch.Tensor:
    """`[B, calls]` the user's voice activity as the session reads it: the delay-0 user token of call `o` is frame
    `o`, except call 0, which reads the initial token (silent), like the zero token."""
    row = delay0_user_codebook(demo.config)
    tokens = user[:, row, :calls]
    silent = demo.table[tokens.clamp_min(0), 0] >= 0.5
    silent[tokens < 0] = True
    silent[:, 0] = True
    return silent


def turn_violations(starts: torch.Tensor, silent: torch.Tensor, max_words: int | None = None,
                    min_silence: int = 0) -> int:
    """Word starts that break `max_turn_words` / `min_silence_frames`: words are counted since the user last spoke
    (a frame the user speaks in closes the count after its call's word), silence in frames before the call."""
    violations = 0
    for b in range(starts.shape[0]):
        words = silent_run = 0
        for o in range(starts.shape[1]):
            if starts[b, o]:
                violations += words == 0 and silent_run < min_silence
                words += 1
                violations += max_words is not None and words > max_words
            words, silent_run = (words, silent_run + 1) if silent[b, o] else (0, 0)
    return violations


def said_in_order(text: torch.Tensor, tokens: list[int], padding: torch.Tensor) -> bool:
    """The first `len(tokens)` word tokens of `text` `[T]` are `tokens`, and between the first and the last of them
    there is nothing but padding."""
    positions = (~torch.isin(text, padding)).nonzero().flatten()[: len(tokens)]
    if len(positions) < len(tokens) or text[positions].tolist() != tokens:
        return False
    between = text[positions[0] : positions[-1] + 1]
    return bool(torch.isin(between, torch.tensor(tokens)).sum() + torch.isin(between, padding).sum() == len(between))


# -------------------------------------------------------------------------------------------------- forced text
def test_forced_text_comes_out_in_order_with_only_padding_between(demo):
    flat = [t for word in demo.said for t in word]
    for seed in range(3):
        free = demo.model.generate(demo.user, seed=seed, progress=False)
        forced = demo.model.generate(demo.user, seed=seed, progress=False, forced_text={20: SAID},
                                     tokenizer=demo.tokenizer)
        # before the call the text was forced from, the same seed gives the same stream
        assert torch.equal(forced.text_tokens[:, :20], free.text_tokens[:, :20])
        for b in range(2):
            text = forced.text_tokens[b, 20:]
            assert said_in_order(text, flat, demo.padding), (seed, b, text.tolist())
            # a started word is said in consecutive frames
            first = (text == flat[0]).nonzero()[0, 0]
            for word in demo.said:
                start = int((text[first:] == word[0]).nonzero()[0, 0]) + first
                assert text[start : start + len(word)].tolist() == word
                first = start + len(word)
        assert not said_in_order(free.text_tokens[0, 20:], flat, demo.padding)  # the model would not say it


def test_prompt_text_and_say_per_slot(demo):
    c = demo.config
    later = [[demo.said[2][0], demo.said[2][1]], demo.said[0]]  # token ids this time
    texts = []
    with demo.model.streaming(2, seed=4, prompt_text="hello tomorrow", tokenizer=demo.tokenizer) as stream:
        for t in range(FRAMES):
            if t == 45:
                assert stream.say(later, mask=torch.tensor([False, True])) == 3
            out = stream.step(demo.user[:, :, t : t + 1])
            if out.tokens is not None:
                texts.append(out.tokens[:, 0, 0])
        assert not any(stream.constraints.forced_words) and (stream.constraints.forced_token == -1).all()  # everything was said
    text = torch.stack(texts, dim=1)  # calls 0 .. FRAMES - 1 - max(delays)
    prompt = demo.tokenizer.encode("hello") + demo.tokenizer.encode("tomorrow")
    for b in range(2):
        assert said_in_order(text[b], prompt, demo.padding)
    assert said_in_order(text[1, 45:], [t for word in later for t in word], demo.padding)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        with demo.model.streaming(1) as stream:
            stream.say("hello")
    with demo.model.streaming(1) as stream:
        for bad in ([[c.existing_text_padding_id]], [[c.text_card_out]], [[]], [[1.5]]):
            with pytest.raises(ValueError, match="non-empty list of text token ids"):
                stream.say(bad)
        with pytest.raises(ValueError, match="max_wait_frames=-1"):
            stream.say([[5]], max_wait_frames=-1)
    with pytest.raises(ValueError, match=r"forced_text calls \[200\]"):
        demo.model.generate(demo.user, forced_text={200: [[5]]}, progress=False)


def test_an_overdue_word_starts(demo):
    """The greedy demo model keeps to padding on its own: a forced word waits for it at most `max_wait_frames`."""
    user, word = demo.user[:, :, :40], demo.said[1]
    for wait in (0, 5, None):
        texts = []
        with demo.model.streaming(2, **GREEDY) as stream:
            for t in range(40):
                if t == 10:
                    stream.say([word], max_wait_frames=wait)
                out = stream.step(user[:, :, t : t + 1])
                if out.tokens is not None:
                    texts.append(out.tokens[:, 0, 0])
        text = torch.stack(texts, dim=1)
        if wait is None:  # as long as it likes: here, never
            assert (text == demo.config.existing_text_padding_id).all()
            continue
        first = (text == word[0]).float().argmax(dim=1)
        # `wait` steps on padding, then the end-of-padding or the word, after an end-of-padding the word
        assert ((first >= 10) & (first <= 10 + wait + 1)).all(), (wait, first)
        assert all(said_in_order(text[b, 10:], word, demo.padding) for b in range(2))


def test_reset_forgets_the_words_to_say(demo):
    user = demo.user[:, :, :30]

    def run(say: bool) -> torch.Tensor:
        texts = []
        with demo.model.streaming(2, seed=0) as stream:
            if say:
                stream.say(demo.said)
                stream.reset(torch.tensor([True, False]))
            for t in range(30):
                out = stream.step(user[:, :, t : t + 1])
                if out.tokens is not None:
                    texts.append(out.tokens[:, 0, 0])
        return torch.stack(texts, dim=1)

    plain, said = run(False), run(True)
    assert torch.equal(said[0], plain[0])
    assert not torch.equal(said[1], plain[1])


# ------------------------------------------------------------------------------------------------------- bans
def test_banned_tokens_never_come_out_across_seeds(demo):
    """The text stream's `bad_words_ids`, and `audio_suppress_tokens` / `user_suppress_tokens`, over 20 seeds."""
    user = demo.user[:, :, :40]
    free = [demo.model.generate(user, seed=seed, progress=False) for seed in range(2)]
    words = torch.cat([f.text_tokens.flatten() for f in free])
    words = words[~torch.isin(words, demo.padding)]
    banned_word = int(words.bincount().argmax())
    banned_audio = int(torch.cat([f.audio_codes.flatten() for f in free]).bincount().argmax())
    banned_user = int(torch.cat([f.user_prediction.flatten() for f in free]).bincount().argmax())
    assert (words == banned_word).sum() >= 3  # it would come out
    for seed in range(20):
        out = demo.model.generate(user, seed=seed, progress=False, bad_words_ids=[[banned_word]],
                                  audio_suppress_tokens=[banned_audio], user_suppress_tokens=[banned_user])
        assert not (out.text_tokens == banned_word).any(), seed
        assert not (out.audio_codes == banned_audio).any(), seed
        assert not (out.user_prediction == banned_user).any(), seed
        assert (~torch.isin(out.text_tokens, demo.padding)).any()  # it still speaks


# ------------------------------------------------------------------------------------------------ turn length
@pytest.mark.parametrize("max_words", [1, 2])
def test_max_turn_words_holds_the_text_until_the_user_speaks(demo, max_words):
    silent = user_silent(demo, demo.user, FRAMES - 1)
    free_violations = spoken = 0
    for seed in range(3):
        free = demo.model.generate(demo.user, seed=seed, progress=False)
        free_violations += turn_violations(word_starts(free.text_tokens, demo.padding), silent, max_words)
        out = demo.model.generate(demo.user, seed=seed, progress=False, turn_taking_table=demo.table,
                                  max_turn_words=max_words)
        starts = word_starts(out.text_tokens, demo.padding)
        assert turn_violations(starts, silent, max_words) == 0, seed
        spoken += int(starts.sum())
    assert free_violations > 0 and spoken > 0


def test_min_silence_frames_before_a_new_turn(demo):
    silent = user_silent(demo, demo.user, FRAMES - 1)
    free_violations = spoken = 0
    for seed in range(3):
        free = demo.model.generate(demo.user, seed=seed, progress=False)
        free_violations += turn_violations(word_starts(free.text_tokens, demo.padding), silent, min_silence=6)
        out = demo.model.generate(demo.user, seed=seed, progress=False, turn_taking_table=demo.table,
                                  min_silence_frames=6)
        starts = word_starts(out.text_tokens, demo.padding)
        assert turn_violations(starts, silent, min_silence=6) == 0, seed
        spoken += int(starts.sum())
    assert free_violations > 0 and spoken > 0


def test_turn_settings_need_a_table_and_the_user_branch(demo):
    model, table = demo.model, demo.table
    for setting, need in ((dict(max_turn_words=2), "need turn_taking_table"),
                          (dict(min_silence_frames=3), "need turn_taking_table"),
                          (dict(turn_hold_threshold=0.5), "needs a turn-taking signal: turn_taking_table")):
        with pytest.raises(ValueError, match=need):
            with model.streaming(1, **setting):
                pass
    with pytest.raises(ValueError, match=r"turn_hold_threshold=0.5 needs the user branch"):
        with model.streaming(1, turn_hold_threshold=0.5, turn_taking_table=table, predict_user=False):
            pass
    for bad in (table[:10], table.long(), table[:, :1], table.tolist()):
        with pytest.raises(ValueError, match=r"turn_taking_table must be a float tensor \[card=64"):
            with model.streaming(1, turn_taking_table=bad):
                pass
    # the voice activity needs only the table: turn length works without the user branch (and no user_turn)
    out = model.generate(demo.user[:, :, :20], turn_taking_table=table, max_turn_words=1, predict_user=False,
                         progress=False)
    assert out.user_turn_end is None and out.user_silence is None


# ------------------------------------------------------------------------------------- the turn-taking signal
def test_user_turn_is_the_signal_of_the_forward_logits(demo):
    c, user, table = demo.config, demo.user, demo.table
    out = demo.model.generate(user, turn_taking_table=table, progress=False, **GREEDY)
    horizon = demo.stats.horizon
    assert out.user_silence.shape == (2, horizon, FRAMES) and out.user_turn_end.shape == (2, FRAMES)
    frames = FRAMES - max(c.delays)
    codes = torch.cat([out.text_tokens[:, None], out.audio_codes, user[:, :, 1 : frames + 1]], dim=1)
    with torch.no_grad():
        logits = demo.model(codes).user_logits[:, delay0_user_codebook(c)]  # [B, frames, card]
    silence, turn_end = turn_taking_signal(logits, table)
    torch.testing.assert_close(out.user_turn_end[:, :frames], turn_end, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.user_silence[:, :, :frames], silence.transpose(1, 2), rtol=0, atol=1e-5)
    assert out.user_turn_end.std() > 0.01  # it moves with the dialogue
    assert demo.model.generate(user[:, :, :5], progress=False, **GREEDY).user_turn_end is None
    with demo.model.streaming(2, turn_taking_table=table, **GREEDY) as stream:
        stream.step(user[:, :, :1])
        stream.set_exec_mask(torch.tensor([True, False]))
        turn = stream.step(user[:, :, 1:2]).user_turn
    assert turn.turn_end[0].isfinite() and turn.turn_end[1].isnan()
    assert turn.silence[0].isfinite().all() and turn.silence[1].isnan().all()


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_turn_hold_threshold(demo, sampled):
    """0 holds nothing, 1 every word start, a threshold in between the word starts where P(turn end) is below it.
    The greedy demo model keeps to padding on its own, so the runs say `SAID` (overdue words start when allowed)."""
    settings = {} if sampled else GREEDY
    run = dict(progress=False, seed=3, turn_taking_table=demo.table, forced_text={0: SAID}, tokenizer=demo.tokenizer,
               **settings)
    free = demo.model.generate(demo.user, **run)
    assert word_starts(free.text_tokens, demo.padding).any()
    never = demo.model.generate(demo.user, turn_hold_threshold=0.0, **run)
    for name in ("text_tokens", "audio_codes", "user_prediction", "user_turn_end"):
        assert torch.equal(getattr(never, name), getattr(free, name)), name
    if not sampled:  # and without the forced text: plain greedy streaming
        plain = demo.model.generate(demo.user, progress=False, **GREEDY)
        held_never = demo.model.generate(demo.user, progress=False, turn_taking_table=demo.table,
                                         turn_hold_threshold=0.0, **GREEDY)
        for name in ("text_tokens", "audio_codes", "user_prediction"):
            assert torch.equal(getattr(held_never, name), getattr(plain, name)), name
    always = demo.model.generate(demo.user, turn_hold_threshold=1.0, **run)
    assert (always.text_tokens == demo.config.existing_text_padding_id).all()
    # in between: a word starts at call o only where P(turn end) after call o - 1 reached the threshold
    threshold = float(free.user_turn_end.median())
    some = demo.model.generate(demo.user, turn_hold_threshold=threshold, **run)
    starts = word_starts(some.text_tokens, demo.padding)
    calls = starts.nonzero()
    assert len(calls) > 0 and (calls[:, 1] > 0).all()
    assert (some.user_turn_end[calls[:, 0], calls[:, 1] - 1] >= threshold).all()


# ------------------------------------------------------------------------------------------------ speculation
@pytest.mark.parametrize("top_k", [1, 3])
def test_speculation_is_lossless_with_constraints(demo, top_k):
    constrained = dict(progress=False, seed=5, turn_taking_table=demo.table, forced_text={10: SAID, 50: SAID},
                       tokenizer=demo.tokenizer, max_turn_words=2, min_silence_frames=2, turn_hold_threshold=0.2)
    plain = demo.model.generate(demo.user, **constrained)
    speculated = demo.model.generate(demo.user, speculate_top_k=top_k, **constrained)
    for name in ("text_tokens", "audio_codes", "user_prediction"):
        assert torch.equal(getattr(plain, name), getattr(speculated, name)), name
    # a committed k > 1 cache agrees to ~1e-6 (docs/design.md §3), and so does the signal read from it
    torch.testing.assert_close(plain.user_turn_end, speculated.user_turn_end, rtol=0, atol=1e-5)
    assert speculated.speculation.hits > 0
    assert word_starts(plain.text_tokens, demo.padding).any()


# ------------------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("top_k", [0, 2])
def test_cuda_graphs_equal_eager_with_constraints(top_k):
    torch.manual_seed(0)
    config = MoshiUserPredConfig.from_moshi_lm_kwargs(PARITY_CONFIGS["moshiko_small"])
    model = MoshiUserPredForConditionalGeneration(config).to("cuda").eval()
    generator = torch.Generator().manual_seed(1)
    user = torch.randint(0, config.card, (3, config.n_q - config.dep_q, 80), generator=generator).cuda()
    table = torch.rand(config.card, 6, generator=generator)
    run = dict(progress=False, seed=2, turn_taking_table=table, forced_text={5: [[7, 8], [9]], 40: [[11]]},
               max_turn_words=2, min_silence_frames=1, turn_hold_threshold=0.3, speculate_top_k=top_k)
    graphed = model.generate(user, cuda_graphs=True, **run)
    eager = model.generate(user, cuda_graphs=False, **run)
    for name in ("text_tokens", "audio_codes", "user_prediction"):
        assert torch.equal(getattr(graphed, name), getattr(eager, name)), name
    torch.testing.assert_close(graphed.user_turn_end, eager.user_turn_end, rtol=0, atol=1e-5)
