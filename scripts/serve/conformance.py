"""did serve against the official `openai` Python client: completions, streams, models, errors.

Run by scripts/serve-conformance.sh, which starts the server; the base URL is argv[1].
Exits non-zero, naming the check, when one fails.
"""
import sys

import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def check(what, ok, detail=""):
    if not ok:
        print(f"FAIL {what}: {detail}")
        sys.exit(1)
    print(f"ok   {what}")


models = client.models.list()
model = models.data[0].id
check("models.list names the served model", len(models.data) == 1 and model, models)

done = client.completions.create(model=model, prompt="The ", max_tokens=24, seed=7, n=2)
check("a completion has OpenAI's shape", done.object == "text_completion" and len(done.choices) == 2, done)
check("each choice has text and a finish reason",
      all(c.text and c.finish_reason in ("stop", "length") for c in done.choices), done.choices)
check("usage adds up", done.usage.completion_tokens > 0
      and done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens, done.usage)
again = client.completions.create(model=model, prompt="The ", max_tokens=24, seed=7, n=2)
check("the same seed gives the same completions", [c.text for c in again.choices] == [c.text for c in done.choices])

for stages in ("4,L:0.25", "4"):
    pieces = {0: "", 1: ""}
    finish = {}
    for chunk in client.completions.create(model=model, prompt="The ", max_tokens=24, seed=7, n=2,
                                           stream=True, extra_body={"stages": stages}):
        for c in chunk.choices:
            pieces[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    alone = client.completions.create(model=model, prompt="The ", max_tokens=24, seed=7, n=2,
                                      extra_body={"stages": stages})
    check(f"a stream's texts join into the completion ({stages})",
          [pieces[0], pieces[1]] == [c.text for c in alone.choices], (pieces, alone.choices))
    check(f"a stream ends each choice with its finish reason ({stages})", len(finish) == 2, finish)

try:
    client.completions.create(model=model, prompt="x", temperature=0.2)
    check("temperature 0.2 is refused", False, "no error")
except openai.BadRequestError as e:
    check("temperature 0.2 is refused with a 400 that names top_p", e.status_code == 400 and "top_p" in str(e), e)

try:
    client.completions.create(model="gpt-5", prompt="x")
    check("an unknown model is refused", False, "no error")
except openai.NotFoundError as e:
    check("an unknown model is a 404 naming the served one", model in str(e), e)

try:
    client.completions.create(model=model, prompt="x", extra_body={"stages": "3,L:0.25"})
    check("a bad plan is refused", False, "no error")
except openai.BadRequestError as e:
    check("a bad plan is a 400 about stages", "stages" in str(e), e)

try:
    client.completions.create(model=model, prompt="x", extra_body={"colour": "blue"})
    check("an unknown field is refused", False, "no error")
except openai.BadRequestError as e:
    check("an unknown field is a 400 naming it", "colour" in str(e), e)
print("conformance: every check passed")
