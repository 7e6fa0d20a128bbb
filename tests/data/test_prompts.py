"""The exact text every rollout engine generates from, pinned byte for byte: the golden learning curves
depend on it (a change here must be deliberate, and the curves re-made)."""

from ovr_hpc.config import RLDataConfig, RolloutConfig
from ovr_hpc.data.prompts import prompt_text, rollout_prompt, to_chat_messages
from ovr_hpc.data.prompts import stop_strings as template_stop_strings
from ovr_hpc.eval.benchmarks import EvalSample
from ovr_hpc.eval.config import EvalConfig
from ovr_hpc.eval.runner import prompt_of
from ovr_hpc.rl.prompts import RLPrompt, stop_strings, to_rollout_prompt

INSTRUCTION = "Think it through step by step inside <think> </think>, then give the final answer in \\boxed{}."
CHOICE_INSTRUCTION = ("Think it through step by step inside <think> </think>, then give the letter of the correct "
                      "option in \\boxed{}.")
VISION = "<|vision_start|><|image_pad|><|vision_end|>"
ORZ_HEAD = ("A conversation between User and Assistant. The User asks a question; the Assistant first reasons about "
            "it inside <think> </think>, then answers inside <answer> </answer>, with the final result in \\boxed{}.")


def rl_prompt(problem, images=()):
    images = list(images)
    return RLPrompt("id", "src", problem, "ans", None, images, [(56, 56)] * len(images), "where")


def eval_prompt(cfg, sample):
    """The prompt the eval runner hands its engine for one question."""
    return rollout_prompt(cfg.prompt.template, prompt_of(cfg, sample), list(sample.images), cfg.prompt.system)


def eval_stop_strings(cfg):
    """The stop strings the eval runner generates with."""
    return template_stop_strings(cfg.prompt.template)


def test_chat_prompt_with_an_image(processor):
    p = to_rollout_prompt(rl_prompt("What colour is the square?", ["a.png"]), RLDataConfig())
    assert prompt_text(processor, p) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + VISION
        + "What colour is the square?\n" + INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n")
    assert stop_strings(RLDataConfig(), RolloutConfig()) == []


def test_text_prompt_with_a_system_prompt(processor):
    p = to_rollout_prompt(rl_prompt("What is 2 + 3?"), RLDataConfig(system_prompt="You are a careful solver."))
    assert prompt_text(processor, p) == (
        "<|im_start|>system\nYou are a careful solver.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?\n"
        + INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n")
    bare = to_rollout_prompt(rl_prompt("What is 2 + 3?"), RLDataConfig(instruction=""))
    assert prompt_text(processor, bare) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_orz_prompt(processor):
    data = RLDataConfig(prompt_template="orz")
    p = to_rollout_prompt(rl_prompt("<image>\nHow many sides?", ["a.png"]), data)
    assert prompt_text(processor, p) == (
        ORZ_HEAD + "\nUser: " + VISION + "\nHow many sides?\nAssistant: <think>")
    p = to_rollout_prompt(rl_prompt("How many sides?", ["a.png"]), data)
    assert prompt_text(processor, p) == VISION + ORZ_HEAD + "\nUser: How many sides?\nAssistant: <think>"
    assert stop_strings(data, RolloutConfig(stop=["###"])) == ["###", "User:", "</answer>"]


def test_eval_prompts(processor):
    cfg = EvalConfig()
    mc = EvalSample("q1", "Which shape is red?", "B", "multiple_choice", images=["a.png"],
                    choices=["circle", "square", "triangle"])
    assert prompt_text(processor, eval_prompt(cfg, mc)) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + VISION
        + "Which shape is red?\nA. circle\nB. square\nC. triangle\n" + CHOICE_INSTRUCTION
        + "<|im_end|>\n<|im_start|>assistant\n")
    free = EvalSample("q2", "  What is 7 * 6?  ", "42", "math")
    assert prompt_text(processor, eval_prompt(cfg, free)) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 7 * 6?\n"
        + INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n")
    assert eval_stop_strings(cfg) == []
    cfg.prompt.template = "orz"
    assert prompt_text(processor, eval_prompt(cfg, mc)) == (
        VISION + ORZ_HEAD + "\nUser: Which shape is red?\nA. circle\nB. square\nC. triangle\nAssistant: <think>")
    assert eval_stop_strings(cfg) == ["User:", "</answer>"]


def test_chat_messages_of_a_record():
    """The cold start renders records through the same chat messages."""
    messages = [{"role": "user", "content": "Look: <image> and <image>"}, {"role": "assistant", "content": "ok"}]
    assert to_chat_messages(messages, 2, "Be brief.") == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image"},
                                     {"type": "text", "text": " and "}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]
    assert to_chat_messages([{"role": "user", "content": "Hi"}], 1) == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
