from django.db import models


class Tag(models.Model):
    name = models.CharField(max_length=50, unique=True)

    def __str__(self) -> str:
        return self.name


class Item(models.Model):
    name = models.CharField(max_length=200)
    done = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    tags = models.ManyToManyField(Tag, blank=True, related_name="items")

    class Meta:
        ordering = ("-id",)

    def __str__(self) -> str:
        return self.name

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "done": self.done,
            "created_at": self.created_at.isoformat(),
            "tags": sorted(t.name for t in self.tags.all()),
        }
