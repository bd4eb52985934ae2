"""Stage 1, the data: keypoint metadata, FashionAI files, images, the one affine per sample, the heatmap
codec, training samples and synthetic garments."""
