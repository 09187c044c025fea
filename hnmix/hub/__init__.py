"""The sharing layer: the encoder in timm's layout (`export`), its model card (`card`), and uploads
to the Hugging Face Hub in a background thread (`pusher`), so training never waits on the network.
"""
