"""Constants of Chatterbox Turbo shared by every component (see turbo-spec section 0)."""

S3GEN_SR = 24_000  # output audio and S3Gen mel sample rate
S3_SR = 16_000  # speech tokenizer, voice encoder and CAMPPlus sample rate
TOKEN_HZ = 25  # speech tokens per second
SAMPLES_PER_TOKEN_24K = S3GEN_SR // TOKEN_HZ  # 960
S3GEN_MEL_BINS = 80  # channels of S3Gen's mel: the voice's prompt features, the flow's output
S3GEN_MEL_FRAMES_PER_TOKEN = 2  # S3Gen's mel runs at 50 Hz, speech tokens at 25 Hz
HEAD_DIM = 64  # every attention in Turbo (T3, speech tokenizer, flow) uses 64-wide heads

SPEECH_VOCAB_SIZE = 6561  # valid speech codes (3^8); ids >= this never reach S3Gen
START_SPEECH_TOKEN = 6561
STOP_SPEECH_TOKEN = 6562
T3_SPEECH_VOCAB_SIZE = 6563  # rows of T3's speech embedding and head
S3GEN_SILENCE_TOKEN = 4299
S3GEN_SILENCE_TOKENS_APPENDED = 3

T3_PROMPT_TOKENS = 375  # 15 s of reference audio at 25 Hz
T3_PROMPT_SAMPLES_16K = 15 * S3_SR
S3GEN_PROMPT_SAMPLES_24K = 10 * S3GEN_SR
MIN_REFERENCE_SECONDS = 5.0
MAX_REFERENCE_SECONDS = 60.0  # default bound on a reference clip (decoding stops there)
MAX_NEW_TOKENS = 1000  # upstream's bound and default (inference_turbo's max_gen_len): 40 s of speech

PARALINGUISTIC_TAGS = (
    "[angry]",
    "[fear]",
    "[surprised]",
    "[whispering]",
    "[advertisement]",
    "[dramatic]",
    "[narration]",
    "[crying]",
    "[happy]",
    "[sarcastic]",
    "[clear throat]",
    "[sigh]",
    "[shush]",
    "[cough]",
    "[groan]",
    "[sniff]",
    "[gasp]",
    "[chuckle]",
    "[laugh]",
)

TURBO_REPO_ID = "ResembleAI/chatterbox-turbo"
