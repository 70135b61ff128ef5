from slipstream import SamplingParams


def test_chat_answers_the_capital_of_france(llm_fp32):
    result = llm_fp32.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(temperature=0, max_tokens=30))
    out = result[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
