"""Segmentation at a site (issue 17): the network's input without a mask
(:mod:`client.segment.inputs`), its training and sliding-window inference
(:mod:`client.segment.network`), the quality of a mask it made (:mod:`client.segment.quality`)
and a site's work with it (:mod:`client.segment.site`)."""
