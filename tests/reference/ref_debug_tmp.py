from chatterbox.tts_turbo import ChatterboxTurboTTS, punc_norm


def conds(tensors, params):
    tts = ChatterboxTurboTTS.from_local(params["ckpt_dir"], "cpu")
    tts.prepare_conditionals(params["wav_path"])
    c = tts.conds
    text = punc_norm(params["text"])
    ids = tts.tokenizer(text, return_tensors="pt", padding=True, truncation=True).input_ids
    return {
        "speaker_emb": c.t3.speaker_emb,
        "t3_tokens": c.t3.cond_prompt_speech_tokens,
        "prompt_token": c.gen["prompt_token"],
        "prompt_feat": c.gen["prompt_feat"],
        "embedding": c.gen["embedding"],
        "ids": ids,
    }, {}
