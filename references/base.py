"""What the image-computed references (Gabor bank, pretrained network) share.

A reference answers ``targets(images, image_ids) -> [(rows, Y)]``: groups of batch rows and
the reference representation for them (voxel references return one group per subject and
only the rows with a response). An image-computed reference has a response for every image, so
it returns a single group holding every row, with ``Y = representation(images)``.
"""

from __future__ import annotations

import torch


class ImageReference:
    """Base of references computed from the images themselves: subclasses define
    ``representation(images) -> (n, ...)``; ``targets`` wraps it in the one-group protocol."""

    def representation(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def targets(self, images: torch.Tensor,
                image_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if len(image_ids) != len(images):
            raise ValueError(f"image_ids has {len(image_ids)} entries for {len(images)} images")
        rows = torch.arange(len(images), device=images.device)
        return [(rows, self.representation(images))]
